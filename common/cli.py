"""Strict command line over fire: unknown flags and ill-typed values fail before any work starts.

fire alone parses types from the value (`--lr=1e-5` is a float, `--name=001` a string, `--flag=false` the *truthy*
string 'false') and reports a misspelt flag only after `main` has run with the defaults. Here every `--key` must be a
parameter of the function, each value is coerced to the type of that parameter's default, and only then does fire
dispatch (so `--help` still works). A script copied elsewhere can replace `cli.run(main)` with `fire.Fire(main)`.
"""

import inspect
import sys

import fire

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def coerce(name: str, raw: str, default):
    """Turn the command-line string `raw` into the type of `default`; raise ValueError naming the flag."""
    if isinstance(default, bool):
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise ValueError(f"--{name} expects true/false, got {raw!r}")
    if isinstance(default, int):
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--{name} expects an integer, got {raw!r}") from None
        if not value.is_integer():
            raise ValueError(f"--{name} expects an integer, got {raw!r}")
        return int(value)
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--{name} expects a number, got {raw!r}") from None
    if default is None:  # "inherit" flags: keep None, else a plain string
        return None if raw.lower() == "none" else raw
    return raw  # str flags stay strings: '001' stays '001', '7b' stays '7b'


def parse(fn, argv: list[str]) -> dict:
    """Parse `--key value`, `--key=value` and bare `--flag` (bool) against fn's signature."""
    params = inspect.signature(fn).parameters
    positional = [p for p in params if params[p].default is inspect.Parameter.empty]  # e.g. `compare A B`
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            free = [p for p in positional if p not in out]
            if not free:
                raise ValueError(f"unexpected positional argument {arg!r} (flags look like --name value)")
            out[free[0]], i = arg, i + 1
            continue
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in params:
            known = ", ".join(f"--{p}" for p in params)
            raise ValueError(f"unknown flag --{key}. Known flags: {known}")
        default = params[key].default
        default = "" if default is inspect.Parameter.empty else default
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if isinstance(default, bool) and (nxt is None or nxt.startswith("--")):
                raw = "true"
            elif nxt is None:
                raise ValueError(f"--{key} needs a value")
            else:
                raw, i = nxt, i + 1
        out[key] = coerce(key, raw, default)
        i += 1
    missing = [p for p in positional if p not in out]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    return out


def run(target, argv: list[str] | None = None):
    """Run a function, or one of a dict of sub-commands picked by the first word ("" = the default command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fn = target
    if isinstance(target, dict):
        if argv and argv[0] in target and argv[0]:
            fn, argv = target[argv[0]], argv[1:]
        elif "" in target:
            fn = target[""]
        else:
            sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(target)}}} [--flag value ...]")
    if any(a in ("-h", "--help") for a in argv):
        return fire.Fire(fn, command=["--help"])
    try:
        kwargs = parse(fn, argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Hand fire literals it cannot misread: repr() round-trips str/int/float/bool/None exactly.
    fire.Fire(fn, command=[f"--{k}={v!r}" for k, v in kwargs.items()])
