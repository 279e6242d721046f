"""``dpdist generate`` (issue 15): text from a run's model or a Hugging Face folder.

- Greedy decoding of a Hugging Face folder (llama, gpt2) gives exactly the ids of transformers'
  ``generate(do_sample=False)`` on the same framed prompt, with and without an eos that stops it early
  (the tokenizer's padded rows suppressed there, as dpdist never chooses them).
- Nucleus sampling: the same seed the same ids, another seed others; a vanishing top-p is greedy; 20000
  draws from a fixed logits vector hit the nucleus ids with their renormalised probabilities within 5
  standard errors and never an id outside it.
- The loop on a stub model: the context is cropped to max_seq_len keeping its last tokens, ids past the
  tokenizer's vocabulary are never chosen even when their logit is the largest, eos ends it.
- The command: prints the prompt and its continuation for a Hugging Face folder, a sentencepiece run
  (its final model and a checkpoint of the same weights agree) and a LoRA run on a Hugging Face
  tokenizer; one-line refusals (exit 2) for what it cannot sample from.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpdist.cli import main
from dpdist.config import dump_config, load_config
from dpdist.data.text_tokenizer import load_text_tokenizer
from dpdist.eval.generate import frame_prompt, next_token, sample
from dpdist.model.hf import load_pretrained

from helpers import ROOT
from helpers.hf_folders import VOCAB, pairs_file, pretrained_folder
from helpers.runs import prepared, train_in_process

PROMPTS = ["", "the patient", "order 1234 arrived"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny llama and gpt2 folders whose weights are far enough from their init that greedy decoding
    wanders over many ids instead of repeating one (a random tied GPT-2 echoes its last token)."""
    from transformers import AutoModelForCausalLM

    made = {}
    for kind in ("llama", "gpt2"):
        folder = pretrained_folder(tmp_path_factory.mktemp(kind), kind)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
        model.save_pretrained(folder)
        made[kind] = folder
    return made


def transformers_greedy(folder, context, max_new_tokens, eos_id, pad_id):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # only the eos passed below stops it
    tokenizer_ids = load_text_tokenizer(folder).num_ids
    out = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                         pad_token_id=pad_id, suppress_tokens=list(range(tokenizer_ids, VOCAB)))
    return out[0, len(context):].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_is_transformers_greedy(folders, kind):
    folder = folders[kind]
    tokenizer = load_text_tokenizer(folder)
    assert (tokenizer.num_ids, tokenizer.vocab_size) == (300, VOCAB)  # the config pads 4 rows no token uses
    model = load_pretrained(folder, torch.float64).eval()
    for prompt in PROMPTS:
        context = frame_prompt(tokenizer, prompt)
        assert context == [tokenizer.bos_id] + tokenizer.encode(prompt)  # both fixtures put bos in front
        free = list(sample(model, context, 16, vocabulary=300, eos_id=None))
        assert len(set(free)) > 5, free  # a path that discriminates
        assert free == transformers_greedy(folder, context, 16, None, tokenizer.pad_id)
        stop = free[5]
        stopped = list(sample(model, context, 16, vocabulary=300, eos_id=stop))
        assert stopped == free[: free.index(stop) + 1]
        assert stopped == transformers_greedy(folder, context, 16, stop, tokenizer.pad_id)
        real = list(sample(model, context, 16, vocabulary=300, eos_id=tokenizer.eos_id))
        assert real == transformers_greedy(folder, context, 16, tokenizer.eos_id, tokenizer.pad_id)


def test_a_text_without_bos_starts_after_an_eos(tmp_path):
    folder = pretrained_folder(tmp_path, "gpt2")
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}')
    tokenizer = load_text_tokenizer(folder)
    assert frame_prompt(tokenizer, "the patient") == [tokenizer.eos_id] + tokenizer.encode("the patient")
    assert frame_prompt(tokenizer, "") == [tokenizer.eos_id]


def test_sampling_is_reproducible_and_a_vanishing_top_p_is_greedy(folders):
    tokenizer = load_text_tokenizer(folders["llama"])
    model = load_pretrained(folders["llama"], torch.float64).eval()
    context = frame_prompt(tokenizer, "the patient")

    def draw(**kwargs):
        return list(sample(model, context, 16, vocabulary=300, eos_id=None, **kwargs))

    first = draw(temperature=1.0, top_p=0.9, seed=3)
    assert first == draw(temperature=1.0, top_p=0.9, seed=3)
    assert first != draw(temperature=1.0, top_p=0.9, seed=4)
    assert draw(temperature=1.0, top_p=1e-9, seed=3) == draw(temperature=0.0)
    assert first != draw(temperature=0.0)


def nucleus(probs: list[float], temperature: float, top_p: float) -> dict[int, float]:
    """The reference: tempered probabilities, the most likely ids until they reach top_p, renormalised."""
    tempered = [p ** (1 / temperature) for p in probs]
    tempered = [p / sum(tempered) for p in tempered]
    kept, total = {}, 0.0
    for i in sorted(range(len(probs)), key=lambda i: -tempered[i]):
        if total >= top_p:
            break
        kept[i], total = tempered[i], total + tempered[i]
    return {i: p / total for i, p in kept.items()}


@pytest.mark.parametrize("temperature,expected_kept", [(1.0, 6), (0.5, 4)])
def test_nucleus_draws_match_the_renormalised_probabilities(temperature, expected_kept):
    probs = [0.08, 0.3, 0.02, 0.15, 0.25, 0.06, 0.1, 0.04]  # cumulative in order: .30 .55 .70 .80 .88 .94 .98 1
    logits = torch.tensor([math.log(p) for p in probs] + [float("-inf")], dtype=torch.float64) + 1.7
    reference = nucleus(probs, temperature, 0.9)
    assert len(reference) == expected_kept
    generator, n = torch.Generator().manual_seed(0), 20000
    counts = [0] * len(logits)
    for _ in range(n):
        counts[next_token(logits, temperature, 0.9, generator)] += 1
    for i, count in enumerate(counts):
        p = reference.get(i, 0.0)
        if p == 0.0:
            assert count == 0, f"id {i} is outside the nucleus but was drawn {count} times"
        else:
            assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n), (i, count / n, p)


class Stub(nn.Module):
    """Logits that make ``last id + 1 (mod 8)`` the best real id, and padding id 9 better still."""

    def __init__(self, window: int):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=window)
        self.anchor = nn.Parameter(torch.zeros(()))  # where the model lives
        self.seen = []

    def forward(self, ids):
        self.seen.append(ids[0].tolist())
        logits = torch.zeros(1, ids.shape[1], 10, dtype=torch.float64)
        logits[0, -1, (int(ids[0, -1]) + 1) % 8] = 5.0
        logits[0, -1, 9] = 10.0
        return logits


def test_the_context_keeps_its_last_tokens_and_padding_ids_are_never_chosen():
    stub = Stub(window=4)
    ids = list(sample(stub, [5, 6], 12, vocabulary=8, eos_id=None))
    assert ids == [(7 + k) % 8 for k in range(12)]
    whole = [5, 6] + ids
    assert stub.seen == [whole[: 2 + k][-4:] for k in range(12)]
    assert list(sample(Stub(4), [5], 12, vocabulary=8, eos_id=1)) == [6, 7, 0, 1]
    drawn = list(sample(Stub(4), [0], 300, vocabulary=8, eos_id=None, temperature=2.0, top_p=1.0, seed=1))
    assert max(drawn) < 8 and len(set(drawn)) == 8  # every real id is possible, no padding id ever comes


def test_generate_prints_the_prompt_and_its_greedy_continuation(folders, capsys):
    folder = folders["llama"]
    tokenizer = load_text_tokenizer(folder)
    model = load_pretrained(folder, torch.float32).eval()  # what the command loads
    ids = list(sample(model, frame_prompt(tokenizer, "the patient"), 10, vocabulary=300, eos_id=tokenizer.eos_id))
    ids = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
    assert main(["generate", str(folder), "--prompt", "the patient", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == "the patient" + tokenizer.decode(ids) + "\n"  # byte-level BPE: decodes piecewise
    sampled = ["generate", str(folder), "--prompt", "the patient", "--max-new-tokens", "10", "--seed"]
    outputs = []
    for seed in ("5", "5", "6"):
        assert main(sampled + [seed]) == 0
        outputs.append(capsys.readouterr().out)
    same, again, other = outputs
    assert same == again != other and same.startswith("the patient")


def one_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and not captured.out, captured
    return err


def test_refusals(folders, tmp_path, capsys):
    hf = str(folders["llama"])
    unfinished, items = tmp_path / "unfinished", tmp_path / "items"
    for run, extra in ((unfinished, []), (items, ["data.source=zipf_items"])):
        run.mkdir()
        dump_config(load_config(ROOT / "configs/default.yaml", extra), run / "config.yaml")
    cases = [
        ("is not a directory", [str(tmp_path / "nowhere")]),
        ("neither config.yaml", [str(tmp_path)]),
        ("has no final model yet", [str(unfinished)]),
        ("data.source=zipf_items", [str(items)]),
        ("--temperature must be >= 0", [hf, "--temperature", "-0.5"]),
        ("--top-p must be in (0, 1]", [hf, "--top-p", "0"]),
        ("--top-p must be in (0, 1]", [hf, "--top-p", "1.5"]),
        ("--max-new-tokens must be at least 1", [hf, "--max-new-tokens", "0"]),
        ("is not a torch device", [hf, "--device", "floppy"]),
        ("--checkpoint picks a run's weights", [hf, "--checkpoint", hf]),
    ]
    for message, args in cases:
        assert main(["generate", *args, "--prompt", "hi"]) == 2, message
        assert message in one_error(capsys)


@pytest.mark.slow
def test_generate_from_a_sentencepiece_run_and_its_checkpoint(tmp_path, cache, capsys):
    run_dir = prepared(cache, tmp_path / "run", 1, 1, "float32", "train.steps=2", "train.checkpoint_every=1")
    train_in_process(run_dir)
    greedy = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "40"]  # past max_seq_len 32
    assert main(["generate", str(run_dir), *greedy]) == 0
    final = capsys.readouterr().out
    assert final.startswith("def ") and len(final) > len("def \n")
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert main(["generate", str(run_dir), *greedy, "--checkpoint", str(last)]) == 0
    assert capsys.readouterr().out == final  # the last checkpoint holds the final weights
    assert main(["generate", str(run_dir), "--prompt", "import ", "--checkpoint", str(run_dir / "nowhere")]) == 2
    assert "no such file or folder" in one_error(capsys)


@pytest.mark.slow
def test_generate_from_a_lora_run_on_a_hugging_face_tokenizer(tmp_path, cache, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/finetune-llama-lora.yaml"),
                 f"model.pretrained={pretrained_folder(tmp_path / 'llama')}", f"data.path={pairs_file(tmp_path / 'p.jsonl')}",
                 f"data.cache_dir={cache}", "data.seq_len=16", "train.steps=2", "train.batch_size=8",
                 "train.micro_batch_size=4", "train.warmup_steps=0", "train.checkpoint_every=0", "train.progress=false",
                 "parallel.tensor=1", "lora.rank=2", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
                 f"train.run_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert (run_dir / "tokenizer").is_dir()
    assert main(["generate", str(run_dir), "--prompt", "question 3:", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("question 3:")
