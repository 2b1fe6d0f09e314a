"""Train the suite's tiny Llama: a small causal LM that writes real (if odd) English, offline, on one CPU thread.

The text is the documentation that ships inside Python itself (`pydoc_data.topics`: the language
reference behind `help("return")`), so nothing is downloaded. The script

1. trains a byte-level BPE tokenizer on it with the `tokenizers` library and wraps it as a
   transformers `PreTrainedTokenizerFast` (BOS added like Llama's tokenizer does);
2. trains a Llama-architecture model (grouped-query attention: 4 query heads share 2 KV heads, as
   Llama-2-70B's 64 share 8) with AdamW, deterministically (seeds, one thread, a fixed step count);
3. saves everything with `save_pretrained`, weights in float32 and deliberately sharded into three
   safetensors files so that `model.safetensors.index.json` has something to say;
4. records what it did in `training_log.json` and `TRAINING.md`, and checks that the greedy
   completion of a prompt is made of English words.

    python training/train_tiny_llama.py --out data/tiny-llama                      # ~16 min, 1 thread
    python training/train_tiny_llama.py --out /tmp/tiny --steps 20 --skip-checks   # a quick smoke run

The tests never run this script (too slow); they load its committed output from data/tiny-llama.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread for the tokenizer trainer too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("The return statement", "A list is", "The import statement")
#: Common English words; the completion must use several of them (a model emitting noise would not).
COMMON_WORDS = frozenset("""
a an the is are was be been being of to in on at by for with from as and or not no if then else
that this these those it its which when where while each every any all only also can may must
will would should value values object objects function functions name names statement statements
expression expressions list lists class classes method methods argument arguments type types
return returns returned called call new first following used use defined define evaluated
""".split())
HELD_OUT_TOPICS = ("for", "while", "try")  # never trained on: the validation loss is measured on them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-llama")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps (fixed, so runs are reproducible)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-shard-size", default="7MB", help="save_pretrained's shard size: 3 shards in float32")
    p.add_argument("--skip-checks", action="store_true", help="do not assert English output (for smoke runs)")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def corpus() -> tuple[dict[str, str], dict]:
    """The documentation topics that ship with this Python, and a description to record."""
    import pydoc_data.topics

    topics = dict(sorted(pydoc_data.topics.topics.items()))
    joined = "\n".join(f"{k}\n{v}" for k, v in topics.items())
    about = {"source": "pydoc_data.topics.topics (Python standard library)",
             "python": platform.python_version(), "topics": len(topics), "characters": len(joined),
             "sha256": hashlib.sha256(joined.encode()).hexdigest(), "held_out_topics": list(HELD_OUT_TOPICS)}
    return topics, about


def train_tokenizer(texts: list[str], vocab_size: int, context: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (as GPT-2 and Llama-3 use): any text encodes, no unknown characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])  # BOS first, like Llama
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=context, clean_up_tokenization_spaces=False)


def encode(tokenizer: PreTrainedTokenizerFast, topics: dict[str, str], names) -> torch.Tensor:
    """Concatenate the topics as <s> text </s> <s> text </s> ... into one stream of token ids."""
    ids: list[int] = []
    for name in names:
        ids += tokenizer(topics[name], verbose=False)["input_ids"] + [tokenizer.eos_token_id]  # longer than context
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Random windows of context+1 tokens (inputs and shifted targets), forever, from a seeded generator."""
    while True:
        starts = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s:s + context + 1] for s in starts.tolist()])


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, stream: torch.Tensor, context: int) -> float:
    """Mean loss over consecutive windows of the held-out stream."""
    model.eval()
    windows = stream[: (len(stream) - 1) // context * context + 1]
    losses = []
    for start in range(0, len(windows) - 1, context):
        chunk = windows[start:start + context + 1][None]
        losses.append(_loss(model, chunk).item())
    model.train()
    return float(sum(losses) / len(losses))


def _loss(model: LlamaForCausalLM, chunk: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of windows of context+1 tokens (inputs: all but the last; targets: shifted)."""
    logits = model(chunk[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())


def complete(model, tokenizer, prompt: str, new_tokens: int = 40) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def english_check(text: str, corpus_words: set[str]) -> dict:
    """How English the new text is: common words it uses, and the share of its words found in the corpus."""
    words = re.findall(r"[A-Za-z]+", text.lower())
    return {"words": len(words), "common": sorted(set(words) & COMMON_WORDS),
            "in_corpus": sum(w in corpus_words for w in words) / max(1, len(words))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    started = time.perf_counter()

    topics, data_about = corpus()
    train_names = [k for k in topics if k not in HELD_OUT_TOPICS]
    tokenizer = train_tokenizer([topics[k] for k in train_names], args.vocab_size, args.context)
    train_stream = encode(tokenizer, topics, train_names)
    val_stream = encode(tokenizer, topics, HELD_OUT_TOPICS)
    data_about.update(train_tokens=len(train_stream), held_out_tokens=len(val_stream),
                      characters_per_token=round(data_about["characters"] / (len(train_stream) + len(val_stream)), 2))
    tokenizer_seconds = time.perf_counter() - started
    print(f"tokenizer: {len(tokenizer)} tokens in {tokenizer_seconds:.1f} s; "
          f"train {len(train_stream):,} tokens, held out {len(val_stream):,}")

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.context, rms_norm_eps=1e-5, initializer_range=0.02,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    data = batches(train_stream, args.batch_size, args.context, generator)
    history = []
    model.train()
    train_start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = _loss(model, next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - train_start
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            print(f"step {step + 1:>5}/{args.steps}  loss {loss.item():.3f}  {elapsed:6.0f} s", flush=True)
    train_seconds = time.perf_counter() - train_start
    val_loss = evaluate(model, val_stream, args.context)
    final_loss = sum(h["loss"] for h in history[-3:]) / len(history[-3:])
    print(f"trained {args.steps} steps in {train_seconds:.0f} s; held-out loss {val_loss:.3f}")

    model.eval()
    corpus_words = set(re.findall(r"[a-z]+", " ".join(topics.values()).lower()))
    completions = {}
    for prompt in PROMPTS:
        text = complete(model, tokenizer, prompt)
        completions[prompt] = {"text": text, **english_check(text[len(prompt):], corpus_words)}
        print(f"\n{prompt!r} ->\n{text}\n{completions[prompt]}")

    out = args.out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.do_sample = False  # greedy by default: the notebooks compare exact tokens
    model.generation_config.max_new_tokens = 40
    model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir())
    total_bytes = sum(p.stat().st_size for p in tmp.iterdir())
    log = {
        "what": "a tiny Llama trained on Python's own documentation, for notebook 07",
        "script": "training/train_tiny_llama.py",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed, "deterministic": "torch.use_deterministic_algorithms(True), 1 thread, fixed steps",
        "data": data_about,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "special_tokens": ["<unk>", "<s>", "</s>"], "seconds": round(tokenizer_seconds, 1)},
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, "hidden_size": config.hidden_size,
                  "intermediate_size": config.intermediate_size, "layers": config.num_hidden_layers,
                  "attention_heads": 4, "key_value_heads": 2, "context": args.context,
                  "weights_dtype": "float32", "max_shard_size": args.max_shard_size},
        "training": {"optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1)", "lr": args.lr,
                     "schedule": f"linear warm-up {args.warmup} steps, cosine to lr/10",
                     "steps": args.steps, "batch_size": args.batch_size,
                     "tokens_seen": args.steps * args.batch_size * args.context,
                     "epochs": round(args.steps * args.batch_size * args.context / len(train_stream), 2),
                     "final_train_loss": round(final_loss, 4), "held_out_loss": round(val_loss, 4),
                     "seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / args.steps, 3),
                     "history": history},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "tokenizers": __import__("tokenizers").__version__},
        "greedy_completions": completions,
        "files": files, "total_bytes": total_bytes,
    }
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (tmp / "TRAINING.md").write_text(training_md(log))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"\nwrote {out} ({total_bytes / 1e6:.1f} MB): {', '.join(files)}")

    if args.skip_checks:
        return 0
    for prompt, result in completions.items():  # the promise of this model: it writes English words
        assert result["words"] >= 5 and len(result["common"]) >= 3 and result["in_corpus"] >= 0.8, (prompt, result)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert 2 <= len(shards) <= 3 and "model.safetensors.index.json" in files, files
    assert total_bytes < 25e6, total_bytes
    return 0


def training_md(log: dict) -> str:
    t, m, d = log["training"], log["model"], log["data"]
    rows = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['seconds']:.0f} |" for h in t["history"])
    samples = "\n\n".join(f"**{p!r}** ->\n\n```text\n{c['text']}\n```" for p, c in log["greedy_completions"].items())
    return f"""# tiny-llama: how it was trained

Written by `{log['script']}` (`{log['command']}`), finished {log['finished']}.

- **Data**: {d['source']}, Python {d['python']}: {d['topics']} topics, {d['characters']:,} characters
  (sha256 `{d['sha256'][:16]}...`). Held out for validation: {', '.join(d['held_out_topics'])}.
  {d['train_tokens']:,} training tokens, {d['held_out_tokens']:,} held out ({d['characters_per_token']} characters
  per token).
- **Tokenizer**: {log['tokenizer']['kind']}, {log['tokenizer']['vocab_size']} tokens, BOS `<s>` added to every input.
- **Model**: {m['architecture']}, {m['parameters']:,} parameters: hidden {m['hidden_size']}, MLP
  {m['intermediate_size']}, {m['layers']} layers, {m['attention_heads']} query heads sharing {m['key_value_heads']}
  KV heads (grouped-query attention, as in Llama-2-70B), context {m['context']}. Weights stored in
  **{m['weights_dtype']}**, sharded at {m['max_shard_size']} per file.
- **Training**: {t['optimizer']}, lr {t['lr']}, {t['schedule']}; {t['steps']} steps of {t['batch_size']} x
  {m['context']} tokens ({t['tokens_seen']:,} tokens, {t['epochs']} epochs); seed {log['seed']}
  ({log['deterministic']}).
- **Result**: final training loss {t['final_train_loss']:.3f}, held-out loss {t['held_out_loss']:.3f}.
- **Time**: {t['seconds']:.0f} s ({t['seconds_per_step']} s per step) on {log['machine']['processor']},
  {log['machine']['torch_threads']} torch thread(s) of {log['machine']['cpu_count']} cores;
  Python {log['machine']['python']}, torch {log['machine']['torch']}, transformers {log['machine']['transformers']},
  tokenizers {log['machine']['tokenizers']}.

It learned the *style* of the language reference from very little data; it repeats itself and
does not know Python, but its words are English, which is all the notebooks need to show that a
prompt is completed identically wherever the weights live.

## Greedy completions

{samples}

## Loss

| step | training loss | seconds |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    sys.exit(main())
