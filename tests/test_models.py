"""Tokenizer and small models: round trips, generate, the three architectures, safetensors checkpoints."""

import pytest
import torch

from hybridlab.tasks.models import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_model,
    build_tokenizer,
    decode_responses,
    encode_prompts,
    load_model_dir,
    model_config,
    save_model_dir,
)
from hybridlab.tasks.toy import CHARS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_ids_and_round_trip(tok, tmp_path):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok) == 3 + len(CHARS)
    for text in ("12+345=", "0", "9876543210="):
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID and len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast

    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again("31+4=")["input_ids"] == tok("31+4=")["input_ids"]


def test_encode_prompts_left_pads_and_rejects_unknown_chars(tok):
    enc = encode_prompts(tok, ["1=", "1234="])
    assert enc["input_ids"].tolist()[0][:3] == [PAD_ID, PAD_ID, PAD_ID]
    assert enc["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    with pytest.raises(ValueError, match="outside the tokenizer"):
        encode_prompts(tok, ["12a="])


def test_decode_responses_mask_includes_eos(tok):
    d = {c: tok.convert_tokens_to_ids(c) for c in "0123"}
    tokens = torch.tensor(
        [
            [d["3"], d["2"], EOS_ID, PAD_ID],
            [d["1"], d["0"], d["1"], d["2"]],  # no EOS: truncated, every token counts
            [EOS_ID, PAD_ID, PAD_ID, PAD_ID],
            [d["1"], PAD_ID, d["2"], EOS_ID],  # a sampled special token stays visible
        ]
    )
    texts, mask = decode_responses(tok, tokens)
    assert texts == ["32", "1012", "", "1<pad>2"]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_forward_and_generate(arch, tok):
    model = build_model(arch, "tiny", vocab_size=len(tok), seed=0)
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    enc = encode_prompts(tok, ["12=", "4567+1="])
    out = model(**enc)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    torch.manual_seed(0)
    seq = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=5)
    assert seq.shape[0] == 2 and 1 <= seq.shape[1] - enc["input_ids"].shape[1] <= 5
    assert int(seq.max()) < len(tok) and torch.equal(seq[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    # the same seed builds the same weights; another seed does not
    same = build_model(arch, "tiny", vocab_size=len(tok), seed=0)
    other = build_model(arch, "tiny", vocab_size=len(tok), seed=1)
    w = next(model.parameters())
    assert torch.equal(w, next(same.parameters())) and not torch.equal(w, next(other.parameters()))


def test_model_config_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        model_config("bert", "tiny", 15)
    with pytest.raises(ValueError, match="size must be one of"):
        model_config("llama", "huge", 15)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_round_trip_is_safetensors(arch, tok, tmp_path):
    model = build_model(arch, "tiny", vocab_size=len(tok), seed=3)
    save_model_dir(model, tok, tmp_path / "ck", meta={"note": "x"})
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded, tok2 = load_model_dir(tmp_path / "ck")
    ids = encode_prompts(tok2, ["123=", "9+9="])
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, loaded(**ids).logits, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert tok2.padding_side == "left" and tok2.eos_token_id == EOS_ID


def test_load_refuses_non_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model_dir(tmp_path)
