"""Strict command line over fire: unknown flags and ill-typed values fail before any work starts.

fire alone parses types from the value (`--lr=1e-5` is a float, `--name=001` a string, `--flag=false` the *truthy*
string 'false') and reports a misspelt flag only after `main` has run with the defaults. Here every `--key` must be a
parameter of the function, each value is coerced to the type of that parameter's default, and only then does fire
dispatch.

Choice flags are declared in the signature as `typing.Literal` (`engine: Literal["hf", "vllm"] = "hf"`); a value
outside the set fails here with the allowed values listed. Python callers get the same check from
`cli.check_choices(fn, locals())`, the first line of every command. A three-state switch is `bool | None` with
None = auto (`--x auto` or `--x none` gives None; true/false/1/0/yes/no/on/off give the bool).

`--help` lists every flag with its default, the comment on its line of the signature and any allowed values. A script
copied elsewhere can replace `cli.run(main)` with `fire.Fire(main)`.
"""

import inspect
import re
import sys
import types
import typing

import fire

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def choices(fn) -> dict[str, tuple]:
    """{flag: allowed values} for every parameter of fn annotated `Literal[...]` (or `Literal[...] | None`)."""
    out = {}
    for name, ann in typing.get_type_hints(fn).items():
        args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        lits = [a for a in args if typing.get_origin(a) is typing.Literal]
        if lits:
            out[name] = tuple(v for a in lits for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return out


def check_choices(fn, values: dict) -> None:
    """Raise ValueError naming the flag and its allowed values when a Literal-annotated value is outside its set.

    Called by parse() for the command line and as the first line of each command for Python callers."""
    for name, allowed in choices(fn).items():
        if name in values and values[name] not in allowed:
            shown = " | ".join("none" if a is None else str(a) for a in allowed)
            raise ValueError(f"--{name} must be one of: {shown}; got {values[name]!r}")


def _is_optional_bool(fn, name: str) -> bool:
    """True for a parameter annotated `bool | None` (a three-state switch: None = auto)."""
    ann = typing.get_type_hints(fn).get(name)
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and set(typing.get_args(ann)) == {bool, type(None)}


def coerce(name: str, raw: str, default, optional_bool: bool = False):
    """Turn the command-line string `raw` into the type of `default` (a `bool | None` flag: a bool, or None for
    'auto'/'none'); raise ValueError naming the flag."""
    if optional_bool:
        if raw.lower() in ("auto", "none"):
            return None
        if raw.lower() in TRUE | FALSE:
            return raw.lower() in TRUE
        raise ValueError(f"--{name} expects true/false/auto, got {raw!r}")
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
    """Parse `--key value`, `--key=value` and bare `--flag` (bool) against fn's signature; raise ValueError on an
    unknown flag, an ill-typed value or a choice outside its Literal set."""
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
            if (isinstance(default, bool) or _is_optional_bool(fn, key)) and (nxt is None or nxt.startswith("--")):
                raw = "true"
            elif nxt is None:
                raise ValueError(f"--{key} needs a value")
            else:
                raw, i = nxt, i + 1
        out[key] = coerce(key, raw, default, _is_optional_bool(fn, key))
        i += 1
    missing = [p for p in positional if p not in out]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    check_choices(fn, out)
    return out


def flags(fn) -> list[tuple[str, object, str]]:
    """(name, default, comment) for each parameter; the comment is the `# ...` on its line of the signature."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):  # no source (e.g. defined in `python -c`): flags without comments
        src = ""
    end = re.search(r"^\)( -> .*)?:", src, re.M)  # a multi-line signature ends at a line starting with ')'
    src = src[: end.start()] if end else src.split("\n")[0]
    out = []
    for name, p in inspect.signature(fn).parameters.items():
        m = re.search(rf"^\s*{name}\s*[:=][^\n]*?#\s*(.*)$", src, re.M)
        default = "(required)" if p.default is inspect.Parameter.empty else f"(default {p.default!r})"
        out.append((name, default, m.group(1).strip() if m else ""))
    return out


def help_text(fn, prog: str) -> str:
    """What --help prints: the docstring's first paragraph, then every flag with its default and comment."""
    doc = (inspect.getdoc(fn) or inspect.getmodule(fn).__doc__ or "").strip().split("\n\n")[0]
    allowed = choices(fn)
    rows = [(n, d, f"{c} [{' | '.join(map(str, allowed[n]))}]".strip() if n in allowed else c) for n, d, c in flags(fn)]
    width = max((len(n) + len(d) for n, d, _ in rows), default=0) + 4
    lines = [f"usage: {prog} [--flag value ...]", "", doc, ""]
    lines += [f"  {f'--{n} {d}':<{width}} {c}".rstrip() for n, d, c in rows]
    return "\n".join(lines)


def run(target, argv: list[str] | None = None):
    """Run a function, or one of a dict of sub-commands picked by the first word ("" = the default command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, fn = sys.argv[0], target
    if isinstance(target, dict):
        if argv and argv[0] in target and argv[0]:
            prog, fn, argv = f"{prog} {argv[0]}", target[argv[0]], argv[1:]
        elif "" in target:
            fn = target[""]
        else:
            usage = "\n".join(f"  {k:<14} {(inspect.getdoc(f) or '').splitlines()[0]}" for k, f in target.items())
            asked = any(a in ("-h", "--help") for a in argv)
            bad = "" if asked else (f"unknown command {argv[0]!r}\n" if argv else "which command?\n")
            print(f"{bad}usage: {prog} {{{'|'.join(target)}}} [--flag value ...]\n{usage}",
                  file=sys.stdout if asked else sys.stderr)
            sys.exit(0 if asked else 2)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(fn, prog))
        return None
    try:
        kwargs = parse(fn, argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Hand fire literals it cannot misread: repr() round-trips str/int/float/bool/None exactly.
    fire.Fire(fn, command=[f"--{k}={v!r}" for k, v in kwargs.items()])
