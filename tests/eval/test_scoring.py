"""The scoring rule, and the whole passkey pipeline scored against a stub model whose answers are known."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mla_components.data import byte_tokenizer
from mla_components.evaluation.passkey import PasskeyGrid, decode_generated, make_trials, run
from mla_components.evaluation.scoring import aggregate_cells, extract_value, is_correct


@pytest.mark.parametrize(
    ("generated", "correct"),
    [
        ("71432", True),
        ("71432.", True),
        ("The pass key is 71432. Remember it.", True),
        (" 71432 and then 11111", True),  # the first run of digits counts
        ("714320", False),  # an extra digit
        ("7143", False),  # a missing digit
        ("71 432", False),  # split digits are two runs
        ("12345 then 71432", False),  # a wrong value first
        ("no idea", False),
        ("", False),
    ],
)
def test_first_digit_run_must_equal_the_needle(generated, correct):
    assert is_correct(generated, "71432") is correct


def test_extraction_and_aggregation():
    assert extract_value("key: 0042!") == "0042"
    assert extract_value("none") is None
    with pytest.raises(ValueError, match="not a string of digits"):
        is_correct("abc", "abc")
    cells = aggregate_cells(
        [
            {"context_tokens": 512, "depth": 0.5, "correct": True},
            {"context_tokens": 512, "depth": 0.5, "correct": False},
            {"context_tokens": 400, "depth": 1.0, "correct": True},
        ]
    )
    assert [(c.context_tokens, c.depth, c.trials, c.correct, c.accuracy) for c in cells] == [
        (400, 1.0, 1, 1, 1.0),
        (512, 0.5, 2, 1, 0.5),
    ]


def test_ids_past_the_tokenizer_vocabulary_decode_as_replacement_characters():
    tokenizer = byte_tokenizer()  # 262 ids; mla_tiny's embedding has 512 rows
    ids = [*b"12", 300, *b"345", tokenizer.eot_id, 511]
    assert decode_generated(tokenizer, ids) == "12\ufffd345\ufffd"


class _IdEmbedding(nn.Embedding):
    """Embeds token id i as the scalar i, so the stub's layer can read the ids back."""

    def __init__(self, vocab: int):
        super().__init__(vocab, 1)
        with torch.no_grad():
            self.weight.copy_(torch.arange(vocab, dtype=torch.float32)[:, None])


class _RecordingLayer(nn.Module):
    """Checks the positions and cache mask it is given, and records the ids it has seen (its "KV cache")."""

    def __init__(self, owner: "AnsweringStub"):
        super().__init__()
        self.owner = [owner]  # a list: not registered as a submodule
        self.kv_cache = None
        self.cache_enabled = False

    def forward(self, h, *, mask, input_pos, **_):
        seen = self.owner[0].seen
        start = len(seen)
        assert input_pos.tolist() == [list(range(start, start + h.shape[1]))]
        cache_len = mask.shape[-1]
        expected = torch.arange(cache_len)[None, :] <= torch.arange(start, start + h.shape[1])[:, None]
        assert torch.equal(mask[0], expected), "each query must see exactly the cached positions up to its own"
        seen.extend(h[0, :, 0].round().long().tolist())
        return h


class AnsweringStub(nn.Module):
    """Stands in for a TransformerDecoder (cache protocol, forward over embeddings, layers and unembed) and answers
    each prompt with a planned text followed by the end-of-turn token, one greedy token at a time."""

    def __init__(self, plan: dict[tuple[int, ...], str], tokenizer, vocab: int = 512):
        super().__init__()
        self.plan = {
            prompt: [*tokenizer.encode(text, add_bos=False, add_eos=False), tokenizer.eot_id]
            for prompt, text in plan.items()
        }
        self.vocab = vocab
        self.tok_embeddings = _IdEmbedding(vocab)
        self.layers = nn.ModuleList([_RecordingLayer(self)])
        self.seen: list[int] = []
        self.decoder_max_cache_seq_len = None

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len=None, decoder_max_seq_len=None):
        self.layers[0].kv_cache, self.layers[0].cache_enabled = nn.Identity(), True
        self.decoder_max_cache_seq_len = decoder_max_seq_len

    def caches_are_setup(self):
        return self.layers[0].kv_cache is not None

    def caches_are_enabled(self):
        return self.layers[0].cache_enabled

    def reset_caches(self):
        self.seen = []

    def forward(self, tokens, *, mask, input_pos):
        """``TransformerDecoder.forward``'s path: ``tokens [b, s]`` -> logits ``[b, 1, vocab]`` (the planned next
        token, whatever the position)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        return self.unembed(h)

    def unembed(self, h):
        prompt = next(p for p in self.plan if tuple(self.seen[: len(p)]) == p)
        response = self.plan[prompt]
        step = len(self.seen) - len(prompt)
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, response[min(step, len(response) - 1)]] = 1.0
        return logits


def _wrong(answer: str) -> str:
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def _planned_answer(trial) -> str:
    """Depth 0: always right. Depth 0.5: right only in trial 0 (wrapped in a sentence). Depth 1: at 400 tokens never
    right, at 512 tokens right in trials 0 and 1."""
    answer, decoy = trial.sample.answer, trial.sample.decoys[0] if trial.sample.decoys else "99999"
    if trial.depth == 0.0:
        return answer
    if trial.depth == 0.5:
        return [f"The pass key is {answer}.", _wrong(answer), f"{decoy} or {answer}", f"{answer}0"][trial.trial]
    if trial.context_tokens == 512 and trial.trial < 2:
        return answer
    return "I do not know."


EXPECTED_ACCURACY = {
    (400, 0.0): 1.0,
    (400, 0.5): 0.25,
    (400, 1.0): 0.0,
    (512, 0.0): 1.0,
    (512, 0.5): 0.25,
    (512, 1.0): 0.5,
}


def test_stub_model_scores_exactly_as_planned(passkey_cfg):
    passkey_cfg.depths = [0.0, 0.5, 1.0]
    passkey_cfg.trials_per_cell = 4
    passkey_cfg.max_new_tokens = 24
    tokenizer = byte_tokenizer()
    trials = make_trials(tokenizer, PasskeyGrid.from_config(passkey_cfg))
    plan = {tuple(t.prompt): _planned_answer(t) for t in trials}
    assert len(plan) == len(trials) == 24  # every prompt is distinct

    paths = run(passkey_cfg, load_model=lambda entry: AnsweringStub(plan, tokenizer))

    results = json.loads(paths["json"].read_text())
    (model,) = results["models"]
    got = {(c["context_tokens"], c["depth"]): c["accuracy"] for c in model["cells"]}
    assert got == EXPECTED_ACCURACY
    assert all(c["trials"] == 4 for c in model["cells"])
    # generation stopped at the stub's end-of-turn token: the stored text is exactly the planned answer
    generated = {(t["context_tokens"], t["depth"], t["trial"]): t["generated"] for t in model["trials"]}
    assert generated == {(t.context_tokens, t.depth, t.trial): plan[tuple(t.prompt)] for t in trials}
    per_length = {row["context_tokens"]: row["accuracy"] for row in model["lengths"]}
    assert per_length == {400: pytest.approx(1.25 / 3), 512: pytest.approx(1.75 / 3)}
    assert model["overall_accuracy"] == pytest.approx(3.0 / 6)


def test_compare_mode_puts_checkpoints_side_by_side(passkey_cfg, tiny_checkpoint):
    tokenizer = byte_tokenizer()
    trials = make_trials(tokenizer, PasskeyGrid.from_config(passkey_cfg))
    right = {tuple(t.prompt): t.sample.answer for t in trials}
    wrong = {tuple(t.prompt): _wrong(t.sample.answer) for t in trials}
    entry = {"_component_": "mla_components.checkpointing.AtomicHFCheckpointer", "checkpoint_dir": str(tiny_checkpoint)}
    passkey_cfg.checkpointer = OmegaConf.create(
        [
            {"name": "always_right", "checkpointer": entry},
            {"name": "always_wrong", "checkpointer": entry, "model": {"_component_": "mla_components.models.gqa_tiny"}},
        ]
    )
    stubs = {"always_right": AnsweringStub(right, tokenizer), "always_wrong": AnsweringStub(wrong, tokenizer)}

    paths = run(passkey_cfg, load_model=lambda e: stubs[e.name])

    models = json.loads(paths["json"].read_text())["models"]
    assert [(m["name"], m["overall_accuracy"]) for m in models] == [("always_right", 1.0), ("always_wrong", 0.0)]
    summary = paths["summary"].read_text().splitlines()
    table = summary[summary.index("") + 1 :]
    assert table[0].split() == ["context", "always_right", "always_wrong"]
    assert table[2].split() == ["400", "1.000", "0.000"] and table[3].split() == ["512", "1.000", "0.000"]
    cells = paths["cells_csv"].read_text().splitlines()
    assert len(cells) == 1 + 2 * 4  # header + 2 models x 2 lengths x 2 depths
