"""The unified MCQ schema (RECIPE §1.1): read any source, validate each row into an Item, bound images.

Row fields: images (list of images or None), question, options (a JSON *string* of {"A": "...", ...}), answer_label,
answer, reasoning, dataset_name, dataset_index (+ hash, misc, and pass_count after curation). A row that cannot
be used raises RowError with the reason; callers count and report it, nothing is dropped silently.

Text that reaches the model (question, options, reasoning) must not hold the model's control strings: the tokenizer
would turn `<|im_start|>` into a real turn marker and `<|vision_start|><|image_pad|><|vision_end|>` into an image
slot with no image (the processor then fails). parse_row rejects every `<|name|>` string (CONTROL_PATTERN: the
Qwen/ChatML family, Llama-3's and Phi's), so data_prep rejects them before any tokenizer is known; callers that
have the model's tokenizer also pass its own special-token texts (common.model.control_strings) as `control`.
"""

import functools
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field

from common.files import iter_jsonl
from common.images import (  # noqa: F401  (one import place)
    RowError, bound_image, load_image, safe_path, source_bytes, to_rgb)

MAX_QUESTION_CHARS = 16_000  # far above any benchmark question; longer ones are garbage or attacks
# `<|name|>` with a name of 3+ word characters: <|im_start|>, <|im_end|>, <|endoftext|>, <|vision_start|>,
# <|image_pad|>, <|eot_id|>, <|end|>, ... (the short minimum leaves math such as <|x|> alone)
CONTROL_PATTERN = r"<\|[A-Za-z][A-Za-z0-9_]{2,63}\|>"
SCHEMA = ("images", "question", "options", "answer_label", "answer", "reasoning", "dataset_name", "dataset_index")


@dataclass
class Item:
    question: str
    options: dict
    answer_label: str
    answer: str
    dataset_name: str
    dataset_index: int
    images: list = field(default_factory=list)
    reasoning: str | None = None
    extra: dict = field(default_factory=dict)  # pass_count, misc, ...


def features(with_images: bool = True):
    """datasets Features of the unified schema."""
    from datasets import Features, Image as DImage, List, Value

    cols = {"question": Value("string"), "options": Value("string"), "answer_label": Value("string"),
            "answer": Value("string"), "reasoning": Value("string"), "dataset_name": Value("string"),
            "dataset_index": Value("int64"), "hash": Value("string"), "misc": Value("string")}
    if with_images:
        cols = {"images": List(DImage()), **cols}
    return Features(cols)


class JsonlRows:
    """A .jsonl file read line by line: a line that is not UTF-8 or not a JSON object becomes a RowError when
    indexed, instead of failing the whole file as datasets' json loader would. Enough of the Dataset API for us."""

    def __init__(self, path: str):
        self.rows = [row if reason is None else RowError(reason) for _, row, reason in iter_jsonl(path)]
        keys = {k for r in self.rows if isinstance(r, dict) for k in r}
        self.column_names = sorted(keys)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        if isinstance(r, RowError):
            raise r
        return r

    def __iter__(self):
        return (r if isinstance(r, dict) else {"_error": str(r)} for r in self.rows)

    def select_columns(self, cols):
        return self


def column(rows, name: str) -> list:
    """Column `name` of every row, read without decoding any row's images (None where a row lacks it or a .jsonl line
    is unreadable): what selecting rows by benchmark needs, before the rows themselves are read."""
    if isinstance(rows, JsonlRows):
        return [r.get(name) if isinstance(r, dict) else None for r in rows.rows]
    if name not in rows.column_names:
        return [None] * len(rows)
    return list(rows.select_columns([name])[name])


def read_row(rows, i: int) -> dict:
    """rows[i], or RowError("unreadable row: ...") when it cannot be read at all: a .jsonl line that is not a JSON
    object, image bytes that datasets/PIL cannot decode (they raise many types). The reason holds no memory address
    (PIL names a buffer by one), so a run's rejects are the same every time."""
    try:
        return rows[i]
    except Exception as e:
        raise RowError("unreadable row: " + re.sub(r" object at 0x[0-9a-f]+", " object", str(e))) from None


TEXT_ONLY = "has images but the model is text-only"


def admit_row(rows, i: int, root: str | None = None, control: frozenset = frozenset(), text_only: bool = False,
              need_images: bool = True, row: dict | None = None) -> "Item":
    """The one admission check for row `i` of `rows` that sft, grpo (training and validation) and evaluate each run
    before using it: read it (read_row, unless the caller already holds it as `row`), validate it (parse_row, the
    model's own control strings in `control` refused), and refuse images when the model is `text_only` (no
    processor). Raises RowError with the reason; each caller keeps its own policy for a failure (count and skip, or
    stop). need_images=False decodes no image; the text-only check then looks the row's image list up in `rows`."""
    item = parse_row(read_row(rows, i) if row is None else row, root, need_images=need_images, control=control)
    if text_only and (item.images if need_images else _lists_images(rows, i)):
        raise RowError(TEXT_ONLY)
    return item


def _lists_images(rows, i: int) -> bool:
    """Whether row i of `rows` lists any image (datasets decodes only that row's, once)."""
    if isinstance(rows, JsonlRows):
        return isinstance(rows.rows[i], dict) and bool(rows.rows[i].get("images"))
    return "images" in rows.column_names and bool(rows.select_columns(["images"])[i]["images"])


def reason_kind(reason: str) -> str:
    """A reject reason with its row-specific values (quoted strings, numbers) blanked to "_", for counting: the one
    spelling of "how many rows were skipped for what" in data_prep's manifest, sft's and grpo's skip lines and
    evaluate's summary. E.g. "over-long: prompt of 3012 tokens > max_prompt_length 2048" ->
    "over-long: prompt of _ tokens > max_prompt_length _"."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\b\d+\b", "_", reason)[:80]


def mix_seed(seed: int, counter: int) -> int:
    """A 63-bit seed for (seed, counter), the one seed mixer: splitmix64 of the pair (Steele et al. 2014), stable
    across Python runs (hash() is salted). Used for per-epoch data orders and per-(prompt, sample) rollout seeds."""
    x = (seed * 0x9E3779B97F4A7C15 + counter + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def load_rows(source: str, split: str = "test", decode_images: bool = True):
    """Rows from a save_to_disk folder, parquet file/folder, jsonl file (line by line), json file, or a hub id.
    decode_images=False gives image cells as {'bytes', 'path'} (see undecoded). A source that cannot be read at all
    stops the script with a message naming it."""
    try:
        rows = _load_rows(source, split)
        return rows if decode_images else undecoded(rows)
    except Exception as e:  # pyarrow/datasets/hub raise many types for unreadable files; anything else is a bug
        if not isinstance(e, (OSError, ValueError, ImportError)) and \
                type(e).__module__.split(".")[0] not in ("pyarrow", "datasets", "huggingface_hub"):
            raise
        raise SystemExit(f"cannot read {source}: {type(e).__name__}: {str(e)[:300]}") from None


def _load_rows(source: str, split: str):
    import datasets

    if os.path.isfile(source) and source.endswith(".jsonl"):
        return JsonlRows(source)
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_dict.json")):
            return datasets.load_from_disk(source)[split]
        if os.path.exists(os.path.join(source, "state.json")):
            return datasets.load_from_disk(source)
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(source) for f in fs if f.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"{source}: no save_to_disk dataset and no .parquet files inside")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if os.path.isfile(source):
        kind = "parquet" if source.endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=source, split="train")
    if source.startswith((".", "/")) or source.endswith((".parquet", ".jsonl", ".json")):
        raise FileNotFoundError(f"{source}: no such file or folder")
    return datasets.load_dataset(source, split=split)


def undecoded(ds):
    """`ds` with its Image and list-of-Image columns read as {'bytes', 'path'} (datasets' decode=False), so the file's
    own bytes reach load_image and a writer can keep them (data_prep); other datasets are returned as they are."""
    from datasets import Image as DImage

    for name, feat in (getattr(ds, "features", None) or {}).items():
        if isinstance(feat, DImage):
            ds = ds.cast_column(name, DImage(decode=False))
        elif isinstance(getattr(feat, "feature", None), DImage):
            ds = ds.cast_column(name, type(feat)(DImage(decode=False)))
    return ds


def data_root(source: str) -> str | None:
    """The folder that relative image paths in `source` resolve against (None for hub datasets)."""
    if os.path.isdir(source):
        return source
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None


def _no_dupes(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise RowError(f"options repeat a letter: {keys}")
    return dict(pairs)


def _text(row, key, required=True) -> str | None:
    v = row.get(key)
    if v is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return None
    if not isinstance(v, str):
        raise RowError(f"field '{key}' is {type(v).__name__}, not str")
    bad = [c for c in v if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\n\r\t"]
    if bad:
        raise RowError(f"field '{key}' has control/surrogate characters ({len(bad)}, e.g. {bad[0]!r})")
    return v


@functools.lru_cache(maxsize=8)
def _control_regex(control: frozenset) -> re.Pattern:
    alternatives = [CONTROL_PATTERN] + [re.escape(t) for t in sorted(control, key=len, reverse=True)]
    return re.compile("|".join(alternatives))


def check_control(field: str, text: str | None, control: frozenset = frozenset()) -> None:
    """Raise RowError if `text` holds a model control string: CONTROL_PATTERN or any string in `control`."""
    if not text:
        return
    m = _control_regex(frozenset(control)).search(text)
    if m:
        raise RowError(f"{field} holds the model control string {m.group(0)!r} (it would become a control token: "
                       "a fake turn or an image slot without an image)")


def parse_options(raw) -> dict:
    """JSON string (or dict) -> {letter: text}; at least two non-empty options, unique letters. A letter whose value is
    None (JSON null) is absent, not empty: Arrow (datasets, parquet) reads dict options back as one struct over the
    union of every row's letters and fills the letters a row lacks with None (datasets#6699). An empty string is still
    an empty option and is refused."""
    if isinstance(raw, str):
        try:
            opts = json.loads(raw, object_pairs_hook=_no_dupes)
        except json.JSONDecodeError as e:
            raise RowError(f"options are not valid JSON ({e.msg})") from None
    else:
        opts = raw
    if not isinstance(opts, dict):
        raise RowError(f"options must be a JSON object of letter -> text, got {type(opts).__name__}")
    opts = {k: v for k, v in opts.items() if v is not None}
    if len(opts) < 2:
        raise RowError(f"options need at least 2 entries, got {len(opts)}")
    for k, v in opts.items():
        if not isinstance(k, str) or not k.strip() or not isinstance(v, str) or not v.strip():
            raise RowError(f"option {k!r} is empty or not text")
        _text({f"option {k}": v}, f"option {k}")  # control characters
    return opts


def parse_row(row: dict, root: str | None = None, need_images: bool = True, control: frozenset = frozenset()) -> Item:
    """Validate one unified-schema row into an Item, or raise RowError saying why it cannot be used.

    `control`: extra strings the question, options and reasoning must not contain (the model tokenizer's special
    tokens, common.model.control_strings); CONTROL_PATTERN is always checked."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    if "_error" in row:  # a line JsonlRows could not read
        raise RowError(row["_error"])
    question = _text(row, "question")
    if not question.strip():
        raise RowError("empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise RowError(f"question is {len(question)} characters (limit {MAX_QUESTION_CHARS})")
    options = parse_options(row.get("options") if row.get("options") is not None else _text(row, "options"))
    label = _text(row, "answer_label").strip()
    if label not in options:
        raise RowError(f"answer_label {label!r} is not among the options {list(options)}")
    answer = _text(row, "answer")
    if answer.strip() != options[label].strip():
        raise RowError(f"answer {answer[:60]!r} differs from option {label} {options[label][:60]!r}")
    name = _text(row, "dataset_name")
    index = row.get("dataset_index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise RowError(f"dataset_index must be an integer, got {index!r}")
    reasoning = _text(row, "reasoning", required=False)
    check_control("question", question, control)
    for letter, option in options.items():
        check_control(f"option {letter}", option, control)
    check_control("reasoning", reasoning, control)
    raw_images = row.get("images") or []
    if not isinstance(raw_images, (list, tuple)):
        raise RowError("images must be a list")
    images = [load_image(v, root) for v in raw_images] if need_images else []
    extra = {k: row[k] for k in row if k not in SCHEMA}
    return Item(question, options, label, answer, name, index, images, reasoning, extra)


def to_row(item: Item, keep_images: bool = True) -> dict:
    """Item -> unified-schema row (options serialised with json.dumps(..., ensure_ascii=False)). An image that
    load_image decoded from unchanged JPEG/PNG bytes is written as those bytes (no re-encode); the others (turned,
    flattened, resized, drawn) as datasets encodes a PIL image: PNG, lossless."""
    images = [{"bytes": source_bytes(im), "path": None} if source_bytes(im) else im for im in item.images]
    return {"images": (images or None) if keep_images else None, "question": item.question,
            "options": json.dumps(item.options, ensure_ascii=False), "answer_label": item.answer_label,
            "answer": item.answer, "reasoning": item.reasoning, "dataset_name": item.dataset_name,
            "dataset_index": item.dataset_index,
            "hash": hashlib.sha256(f"{item.question}{item.answer}".encode()).hexdigest()[:16],
            "misc": _misc(item.extra.get("misc"))}


def _misc(v):
    return v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
