"""Write a tiny random-weight Llama with its own tokenizer, for running a real vLLM in tests.

No model hub is reachable from the build machines, so the model is made here: a byte-level BPE tokenizer trained
on a small built-in text and a Llama of a few hundred thousand random parameters. The output is the same for the
same library versions (fixed seeds, no time or host in any file).

Usage: python make_tiny_model.py OUTPUT_DIR   (run it with the vLLM virtualenv's python: it has torch,
transformers and tokenizers).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 1024
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
# vLLM's CPU attention supports head sizes from 32 up, so 64 / 2 is the smallest that runs.
NUM_HEADS = 2
NUM_KV_HEADS = 1
MAX_POSITIONS = 2048

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# A plain role-tagged format that needs no special tokens beyond EOS; vLLM calls it for /v1/chat/completions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BASE_TEXT = """\
The gateway receives a request from a scientist and checks the bearer token before anything else happens.
It reads the model name, finds the endpoints that serve that model, and picks the one that is ready and least busy.
A cluster node starts the model server when no server is running, waits until it answers its health check,
then forwards the request and streams every chunk of the answer back to the caller as server-sent events.
Tokens are counted for each request, written to a usage log, and summed per user, per model and per day.
Batch jobs read a file of requests, run them one after another, and write a file of results that can be fetched.
When an endpoint is offline or too slow the gateway tries another one, and the client sees a clear error only
when every candidate has failed. Numbers such as 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 appear in logs.
What is the capital of France? Paris is the capital of France. Tell me a short story about a small robot.
Once upon a time, a small robot walked through a quiet forest, counting the trees and listening to the birds.
"""

WORD_TEXT = """
model token request stream answer server cluster node queue batch user group policy endpoint status health usage
limit error retry timeout latency throughput chunk prompt completion chat message role system assistant content
choice index delta finish reason length stop temperature sampling seed random weight layer head hidden
vocabulary tokenizer merge byte pair encoding vector matrix tensor memory cache block page scheduler worker
engine process thread core socket port address route handler gateway federation dispatch transport globus parsl
direct local remote job file result cancel resume restart database table row column index query write read open
close start ready cold hot warm offline online maintenance science physics chemistry biology climate energy
material protein genome galaxy star planet ocean river mountain forest city village school library museum garden
kitchen window door table chair paper pencil letter number question reply because however therefore although
while before after during between among within without quick slow bright dark warm cold large small early late
happy calm busy quiet loud simple complex
"""
WORDS = sorted(set(WORD_TEXT.split()))


def corpus() -> list[str]:
    rng = random.Random(SEED)
    lines = BASE_TEXT.splitlines()
    for _ in range(4000):
        n = rng.randint(4, 14)
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ",", ";", ":"]))
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[UNK, BOS, EOS, PAD],
        # Every byte gets a token, so any text the tests send can be encoded whatever the corpus held.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    raw = build_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    _pin_chat_template(out / "tokenizer_config.json")

    config = LlamaConfig(
        # The model must not emit ids the tokenizer cannot decode, so both share one vocabulary size.
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: vocab {len(tokenizer)}, {params} parameters")


def _pin_chat_template(path: Path) -> None:
    # Newer transformers put the template in chat_template.jinja; older readers only look in tokenizer_config.json.
    config = json.loads(path.read_text())
    if config.get("chat_template") != CHAT_TEMPLATE:
        config["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model into")
    write_model(parser.parse_args().out)


if __name__ == "__main__":
    main()
