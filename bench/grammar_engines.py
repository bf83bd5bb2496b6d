"""Grammar-constrained decoding engines for JSON-schema output: llguidance vs xgrammar vs
outlines_core, on correctness and per-token cost (to choose one for the MLX node).

No model runs. A random "model" draws standard-normal logits (numpy Generator(seed), one
column per token of the logits width) at every step; the engine's token mask sets the
disallowed ones to -inf, a token is sampled from the softmax and fed back to the engine,
until the engine accepts EOS or --max-steps tokens have been drawn. Random logits are the
adversarial case: every token the mask lets through gets picked sooner or later, so a
mask that is too loose shows up as invalid JSON. Each run's tokens are decoded with the
tokenizer and checked with json.loads + jsonschema.validate.

Per library x schema x tokenizer it prints:
  - tok ms: building the library's tokenizer data (once per tokenizer; for outlines_core this
    includes our own pass that turns each token into its bytes, which its Vocabulary needs);
  - compile ms: compiling the schema (once per schema), and new ms: a fresh matcher per
    request, averaged over the seeds. llguidance compiles lazily: its compile is building and
    validating the grammar, the parser is built per matcher (new ms) and lexer states on the
    fly while computing masks (us/token);
  - valid/invalid/unfinished/errors over the seeds. invalid: not JSON, fails the schema, or
    carries a special token (e.g. <|im_start|>) that the mask let into the text;
    unfinished: no EOS within --max-steps; errors: the engine refused a token its own mask
    allowed, left no token allowed, or raised;
  - tokens, us/token mean and p95: the steps timed (generated tokens, EOS included) and the
    time inside the library per step (mask + advance), timed around the library calls only;
    drawing logits, applying the mask and sampling are not counted.
Every engine gets the same single stop token (the tokenizer's eos_token) and the model's
logits width (config.json vocab_size when there is one). An outlines_core Guide is never
advanced on EOS (that raises by design); EOS ends its run when the Guide is in a final state.
Whitespace: every engine is asked for compact JSON (see WHITESPACE below). A library that is
not importable is skipped with a note.

    PYTHONPATH=. HF_HUB_OFFLINE=1 /tmp/vv2/bin/python bench/grammar_engines.py       # ~20 s
    ... bench/grammar_engines.py --seeds 20 --json /tmp/ge.json                       # quick
    ... bench/grammar_engines.py --tokenizer /models/Qwen2.5-7B-Instruct             # + a real one
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

SOAP_BRIEF = {
    "type": "object",
    "properties": {
        "subjective": {"type": "string", "minLength": 1, "maxLength": 160},
        "objective": {"type": "string", "minLength": 1, "maxLength": 160},
        "assessment": {"type": "string", "minLength": 1, "maxLength": 160},
        "plan": {"type": "string", "minLength": 1, "maxLength": 160},
    },
    "required": ["subjective", "objective", "assessment", "plan"],
    "additionalProperties": False,
}

MIXED = {
    "type": "object",
    "properties": {
        "pain_score": {"type": "integer", "minimum": 0, "maximum": 10},
        "disposition": {"enum": ["home", "admit", "refer"]},
        "follow_up": {"type": "boolean"},
        "problems": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 1,
            "maxItems": 3,
        },
        "summary": {"type": "string", "maxLength": 120},
    },
    "required": ["pain_score", "disposition", "follow_up", "problems", "summary"],
    "additionalProperties": False,
}

SCHEMAS = {"SOAP_BRIEF": SOAP_BRIEF, "MIXED": MIXED}

# What each engine is told about whitespace (all: compact JSON, no whitespace between tokens).
WHITESPACE = {
    "llguidance": 'grammar_from_json_schema(overrides={"whitespace_flexible": False}); its default '
    'is flexible whitespace; separators stay at their defaults "," and ":"',
    "xgrammar": 'compile_json_schema(any_whitespace=False, separators=(",", ":")); without '
    'separators it would emit ", " and ": "',
    "outlines_core": 'build_regex_from_schema(whitespace_pattern=""); the default pattern is '
    '"[ ]?" (at most one space around , : { } [ ]), no other option',
}


@dataclass
class Tokenizer:
    """An HF tokenizer plus the logits width and the one EOS id every engine is given."""

    name: str
    hf: object
    vocab_size: int  # logits width: config.json vocab_size when present, else len(tokenizer)
    eos_id: int
    special_ids: frozenset[int]


@dataclass
class Result:
    library: str
    version: str
    tokenizer: str
    schema: str
    seeds: int
    tokenizer_ms: float = 0.0
    compile_ms: float = 0.0
    new_matcher_ms: float = 0.0
    valid: int = 0
    invalid: int = 0
    unfinished: int = 0
    errors: int = 0
    tokens: int = 0
    mean_us: float = math.nan
    p95_us: float = math.nan
    whitespace: str = ""
    why: dict[str, int] = field(
        default_factory=dict
    )  # kind of failure -> runs, over non-valid runs
    samples: list[dict] = field(default_factory=list)  # first few non-valid runs, for the report


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- tokenizers -----------------------------------------------------------------------------


def tiny_model_dir(tmp: Path) -> Path:
    """The tiny test model (cluster.tinymodel). Its weights need mlx; without mlx, write the
    same tokenizer files through the same code (the grammar engines only need those)."""
    from cluster import tinymodel

    try:
        return tinymodel.make_tiny_model(tmp / "tiny")
    except ImportError as e:
        note(f"note: {e}; writing the tiny model's tokenizer only (same training code)")
    from transformers import PreTrainedTokenizerFast

    spec = tinymodel.TinyModelSpec()
    # Mirrors the tokenizer step of make_tiny_model (the files come out byte-identical).
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tinymodel._train_tokenizer(spec.vocab_size),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = tinymodel.CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(str(tmp / "tiny"))
    return tmp / "tiny"


def load_tokenizer(path: Path, name: str) -> Tokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    width = len(hf)
    config = path / "config.json"
    if config.exists():  # the model's logits width can exceed the tokenizer's vocabulary
        cfg = json.loads(config.read_text())
        width = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or width
    if hf.eos_token_id is None:
        raise SystemExit(f"{path}: the tokenizer has no eos_token")
    special = frozenset(i for i, t in hf.added_tokens_decoder.items() if t.special) | set(
        hf.all_special_ids
    )
    return Tokenizer(name, hf, int(width), int(hf.eos_token_id), frozenset(special))


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (unicode char -> byte)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tok: Tokenizer) -> dict[int, bytes]:
    """The exact bytes each ordinary token stands for (special tokens left out), which is the
    vocabulary outlines_core wants; handles byte-level BPE and SentencePiece-style vocabs."""
    decoder_spec = json.dumps(json.loads(tok.hf.backend_tokenizer.to_str()).get("decoder"))
    byte_level = "ByteLevel" in decoder_spec
    table = _byte_level_decoder()
    out = {}
    for piece, i in tok.hf.get_vocab().items():
        if i in tok.special_ids or i >= tok.vocab_size:
            continue
        if byte_level:
            out[i] = bytes(table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode()
    return out


# --- engines: one small adapter per library, all with the same five calls --------------------


class LLGuidance:
    module = "llguidance"

    def prepare(self, tok: Tokenizer) -> None:
        import llguidance.hf
        import llguidance.numpy

        self._np = llguidance.numpy
        self._lltok = llguidance.hf.from_tokenizer(
            tok.hf, n_vocab=tok.vocab_size, eos_token=tok.eos_id
        )

    def compile(self, schema: dict):
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if is_error:
            raise RuntimeError(f"llguidance rejected the schema: {messages}")
        return grammar

    def new_matcher(self, grammar):
        from llguidance import LLMatcher

        m = LLMatcher(self._lltok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill_mask(self, m, bitmask: np.ndarray) -> None:
        self._np.fill_next_token_bitmask(m, bitmask, 0)

    def advance(self, m, token: int) -> bool:
        return m.consume_token(token)

    def finished(self, m) -> bool:
        return m.is_stopped() and not m.is_error()


class XGrammar:
    module = "xgrammar"

    def prepare(self, tok: Tokenizer) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tok.hf, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id]
        )
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._tensors: dict[int, object] = {}

    def compile(self, schema: dict):
        return self._compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(",", ":")
        )

    def new_matcher(self, grammar):
        import xgrammar as xgr

        return xgr.GrammarMatcher(grammar)

    def fill_mask(self, m, bitmask: np.ndarray) -> None:
        # xgrammar takes a torch (or DLPack) tensor; a torch view over our numpy buffer, made once.
        tensor = self._tensors.get(id(bitmask))
        if tensor is None:
            import torch

            tensor = self._tensors[id(bitmask)] = torch.from_numpy(bitmask)
        m.fill_next_token_bitmask(tensor, 0)

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)

    def finished(self, m) -> bool:
        return m.is_terminated()


class OutlinesCore:
    module = "outlines_core"

    def prepare(self, tok: Tokenizer) -> None:
        from outlines_core import Vocabulary

        by_bytes: dict[bytes, list[int]] = {}
        for i, piece in token_bytes(tok).items():
            by_bytes.setdefault(piece, []).append(i)
        self._vocabulary = Vocabulary(tok.eos_id, by_bytes)
        self._eos = tok.eos_id

    def compile(self, schema: dict):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return Index(regex, self._vocabulary)

    def new_matcher(self, grammar):
        from outlines_core import Guide

        return Guide(grammar)

    def fill_mask(self, m, bitmask: np.ndarray) -> None:
        m.write_mask_into(bitmask.ctypes.data, bitmask.size, bitmask.itemsize)

    def advance(self, m, token: int) -> bool:
        if token == self._eos:
            # A Guide never advances on EOS (its own tests expect advance(eos) to raise): the
            # caller stops, and EOS is acceptable when the Guide is in a final state.
            return m.is_finished()
        m.advance(token, return_tokens=False)  # raises on a token it does not allow
        return True

    def finished(self, m) -> bool:
        return m.is_finished()


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines_core": OutlinesCore}


def available(names: list[str]) -> dict[str, object]:
    """The engines that import here, by name; the others are skipped with a note."""
    found = {}
    for name in names:
        try:
            importlib.import_module(ENGINES[name].module)
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken native extension
            note(f"skip {name}: not importable ({type(e).__name__}: {e})")
            continue
        found[name] = ENGINES[name]
    return found


# --- one constrained generation -------------------------------------------------------------


def allowed_tokens(bitmask: np.ndarray, width: int) -> np.ndarray:
    """Unpack a (1, ceil(width/32)) int32 bitmask (bit i of word w = token 32w+i) to bools."""
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:width].astype(bool)


def generate(engine, grammar, tok: Tokenizer, seed: int, max_steps: int, bitmask: np.ndarray):
    """Sample one output under the engine's mask. Returns (status, tokens, per-token library
    ns, new-matcher ns, reason); status is "done", "unfinished" or "error"."""
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    lib_ns: list[int] = []
    t0 = time.perf_counter_ns()
    try:
        m = engine.new_matcher(grammar)
    except Exception as e:  # noqa: BLE001 - a library failure is a result, not a crash
        return "error", tokens, lib_ns, 0, f"new matcher: {type(e).__name__}: {e}"
    new_ns = time.perf_counter_ns() - t0
    for _ in range(max_steps):
        try:
            t0 = time.perf_counter_ns()
            engine.fill_mask(m, bitmask)
            t1 = time.perf_counter_ns()
        except Exception as e:  # noqa: BLE001 - as above
            return "error", tokens, lib_ns, new_ns, f"mask: {type(e).__name__}: {e}"
        allowed = allowed_tokens(bitmask, tok.vocab_size)
        if not allowed.any():
            return "error", tokens, lib_ns, new_ns, "mask allows no token"
        logits = rng.standard_normal(tok.vocab_size)
        logits[~allowed] = -np.inf
        p = np.exp(logits - logits.max())
        token = int(rng.choice(tok.vocab_size, p=p / p.sum()))
        try:
            t2 = time.perf_counter_ns()
            ok = engine.advance(m, token)
            lib_ns.append(t1 - t0 + time.perf_counter_ns() - t2)
        except Exception as e:  # noqa: BLE001 - as above
            return "error", tokens, lib_ns, new_ns, f"advance({token}): {type(e).__name__}: {e}"
        if not ok:
            return "error", tokens, lib_ns, new_ns, f"refused token {token} that its mask allowed"
        if token == tok.eos_id:
            if not engine.finished(m):
                return (
                    "error",
                    tokens,
                    lib_ns,
                    new_ns,
                    "accepted EOS before the grammar was complete",
                )
            return "done", tokens, lib_ns, new_ns, ""
        tokens.append(token)
    return "unfinished", tokens, lib_ns, new_ns, f"no EOS after {max_steps} tokens"


def check(text: str, tokens: list[int], tok: Tokenizer, schema: dict) -> tuple[str, str]:
    """('', '') if the text is JSON that satisfies the schema, else (kind of failure, detail)."""
    import jsonschema

    specials = sorted({tok.hf.convert_ids_to_tokens(t) for t in tokens if t in tok.special_ids})
    if specials:
        return "special token in the text", f"special token(s) {specials} inside the output"
    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg}", f"not JSON: {e}"
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return f"schema: {e.validator} at {where}", f"schema: {where}: {e.message}"
    return "", ""


# --- one library x schema x tokenizer cell --------------------------------------------------


def evaluate(
    name: str,
    engine,
    prep_ms: float,
    version: str,
    tok: Tokenizer,
    schema_name: str,
    seeds: int,
    max_steps: int,
) -> Result:
    schema = SCHEMAS[schema_name]
    r = Result(
        name,
        version,
        tok.name,
        schema_name,
        seeds,
        tokenizer_ms=prep_ms,
        whitespace=WHITESPACE[name],
    )
    try:
        t0 = time.perf_counter_ns()
        grammar = engine.compile(schema)
        r.compile_ms = (time.perf_counter_ns() - t0) / 1e6
    except Exception as e:  # noqa: BLE001 - a schema a library cannot compile is a result
        r.errors = seeds
        r.why[f"compile: {type(e).__name__}"] = seeds
        r.samples.append(
            {"seed": None, "status": "error", "reason": f"compile: {type(e).__name__}: {e}"}
        )
        note(f"  {name} {schema_name}: compile failed: {e}")
        return r
    bitmask = np.full((1, (tok.vocab_size + 31) // 32), -1, dtype=np.int32)
    all_ns: list[int] = []
    new_ns_total = 0
    for seed in range(seeds):
        status, tokens, lib_ns, new_ns, reason = generate(
            engine, grammar, tok, seed, max_steps, bitmask
        )
        all_ns += lib_ns
        new_ns_total += new_ns
        text = tok.hf.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        kind = re.sub(r"\d+", "#", reason)[:80]  # errors: the message with its numbers folded
        if status == "done":
            kind, reason = check(text, tokens, tok, schema)
            status = "invalid" if kind else "valid"
        counter = "errors" if status == "error" else status
        setattr(r, counter, getattr(r, counter) + 1)
        if status != "valid":
            r.why[kind] = r.why.get(kind, 0) + 1
        if status != "valid" and len(r.samples) < 5:
            r.samples.append({"seed": seed, "status": status, "reason": reason, "text": text[:400]})
        if (seed + 1) % 50 == 0:
            note(f"  {name} {tok.name} {schema_name}: {seed + 1}/{seeds} seeds")
    r.new_matcher_ms = new_ns_total / seeds / 1e6
    if all_ns:
        us = np.asarray(all_ns) / 1e3
        r.tokens, r.mean_us, r.p95_us = len(us), float(us.mean()), float(np.percentile(us, 95))
    note(
        f"  {name} {tok.name} {schema_name}: valid {r.valid}/{seeds}, invalid {r.invalid}, "
        f"unfinished {r.unfinished}, errors {r.errors}, {r.mean_us:.1f} us/token"
    )
    for s in r.samples[:2]:
        note(f"    e.g. seed {s['seed']} {s['status']}: {s['reason']}")
    return r


def run_tokenizer(tok: Tokenizer, engines: dict, seeds: int, max_steps: int) -> list[Result]:
    results = []
    for name, cls in engines.items():
        version = importlib.metadata.version(name)
        note(f"{name} {version} on {tok.name} (logits width {tok.vocab_size}, eos {tok.eos_id})")
        engine = cls()
        t0 = time.perf_counter_ns()
        engine.prepare(tok)
        prep_ms = (time.perf_counter_ns() - t0) / 1e6
        for schema_name in SCHEMAS:
            results.append(
                evaluate(name, engine, prep_ms, version, tok, schema_name, seeds, max_steps)
            )
    return results


# --- report ---------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = (
        f"{'library':<14} {'version':<8} {'tokenizer':<14} {'schema':<11} {'tok ms':>8} {'compile ms':>10} "
        f"{'new ms':>7} {'valid/N':>8} {'invalid':>7} {'unfin':>5} {'errors':>6} {'tokens':>7} "
        f"{'mean us/tok':>11} {'p95 us/tok':>10}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.library:<14} {r.version:<8} {r.tokenizer:<14} {r.schema:<11} {r.tokenizer_ms:>8.1f} "
            f"{r.compile_ms:>10.1f} {r.new_matcher_ms:>7.2f} {f'{r.valid}/{r.seeds}':>8} {r.invalid:>7} "
            f"{r.unfinished:>5} {r.errors:>6} {r.tokens:>7} {r.mean_us:>11.1f} {r.p95_us:>10.1f}"
        )
    return "\n".join(rows)


def verdict(results: list[Result]) -> str:
    """Per tokenizer: which libraries were valid on every seed of every schema, and which of
    those spent the least time per token (mean over the schemas' means)."""
    parts = []
    for tok_name in dict.fromkeys(r.tokenizer for r in results):
        rows = [r for r in results if r.tokenizer == tok_name]
        libs = list(dict.fromkeys(r.library for r in rows))
        clean = [lib for lib in libs if all(r.valid == r.seeds for r in rows if r.library == lib)]
        speed = {lib: float(np.mean([r.mean_us for r in rows if r.library == lib])) for lib in libs}
        failing = [
            f"{lib} ({speed[lib]:.1f} us/token; "
            + ", ".join(
                f"{r.schema}: {r.invalid} invalid/{r.unfinished} unfinished/{r.errors} errors"
                for r in rows
                if r.library == lib and r.valid != r.seeds
            )
            + ")"
            for lib in libs
            if lib not in clean
        ]
        ranked = sorted(clean, key=speed.get)
        text = f"On the {tok_name} tokenizer, "
        if ranked:
            best = ranked[0]
            text += (
                f"{' and '.join(ranked)} produced schema-valid JSON on every seed of every schema; "
                f"fastest of those: {best} at {speed[best]:.1f} us/token mean"
                + "".join(
                    f" (vs {lib} {speed[lib]:.1f}, {speed[lib] / speed[best]:.1f}x)"
                    for lib in ranked[1:]
                )
            )
        else:
            text += "no library produced schema-valid JSON on every seed"
        if failing:
            text += f". Not always valid: {'; '.join(failing)}"
        parts.append(text + ".")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=200, help="runs per library x schema x tokenizer"
    )
    parser.add_argument(
        "--max-steps", type=int, default=600, help="tokens per run before it counts as unfinished"
    )
    parser.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="DIR",
        help="also evaluate this local HF tokenizer dir (repeatable); the tiny model's always runs",
    )
    parser.add_argument(
        "--libs", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES)
    )
    parser.add_argument("--json", metavar="FILE", help="write the raw results here")
    args = parser.parse_args()
    engines = available([n.strip() for n in args.libs.split(",") if n.strip()])
    if not engines:
        raise SystemExit("none of the grammar libraries is importable")
    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-grammar-") as tmp:
        tokenizers = [load_tokenizer(tiny_model_dir(Path(tmp)), "tiny-512")]
        tokenizers += [load_tokenizer(Path(d), Path(d).name) for d in args.tokenizer]
        for tok in tokenizers:
            results += run_tokenizer(tok, engines, args.seeds, args.max_steps)
    print()
    print(
        f"JSON-schema constrained sampling from random logits: {args.seeds} seeds, max {args.max_steps} tokens, "
        f"{time.perf_counter() - started:.0f} s wall"
    )
    print(table(results))
    print()
    print("why not valid (runs per kind of failure):")
    for r in results:
        if r.why:
            print(
                f"  {r.library} {r.tokenizer} {r.schema}: "
                + "; ".join(f"{n} {k}" for k, n in sorted(r.why.items(), key=lambda kv: -kv[1]))
            )
    print()
    print("whitespace settings:")
    for name in engines:
        print(f"  {name}: {WHITESPACE[name]}")
    print()
    print("verdict: " + verdict(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
