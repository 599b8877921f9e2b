"""M3Embedder: bge-m3's dense, lexical (sparse) and ColBERT outputs from one pass, as FlagEmbedding's BGEM3FlagModel
gives them, without torch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding

from .batching import Progress, sorted_batches, tokenize_ahead, warn_truncated
from .checks import check_pairs, check_texts, describe, positive_int
from .errors import InputError, InputTypeError, ModelFilesError
from .handle import ModelHandle
from .pooling import normalize as l2_normalize
from .session import CUDA, choose_providers
from .spec import Task
from .tokenize import TextTokenizer, check_encodable

# BGEM3FlagModel's default token limit for queries and passages (bge-m3 itself takes 8192: pass max_length=8192)
FLAG_MAX_LENGTH = 512


def _device_of(devices: object, device: str) -> str:
    """BGEM3FlagModel's ``devices`` as one of ours: "cpu", "cuda", "cuda:0", 0, or a list of one of them."""
    if devices is None:
        return device
    one = devices[0] if isinstance(devices, list) and len(devices) == 1 else devices
    if isinstance(one, int) and not isinstance(one, bool):
        one = f"cuda:{one}"
    if one in ("cpu", "cuda", "cuda:0"):
        chosen = one.split(":")[0]
        if device not in ("auto", chosen):
            raise InputError(f"devices={devices!r} and device={device!r} disagree: give one")
        return chosen
    raise InputError(f"devices={devices!r}: an M3Embedder runs on one device, the CPU or the first GPU (\"cpu\", "
                     "\"cuda\", \"cuda:0\" or 0); for another GPU set CUDA_VISIBLE_DEVICES, for several run one "
                     "M3Embedder per GPU")


def _precision_of(use_fp16: bool | None, use_bf16: bool, precision: str, device: str) -> str:
    """BGEM3FlagModel's use_fp16 / use_bf16 as a precision: on CUDA "auto" (the fp16 graph where the folder has one
    that passed its gate, else fp32), fp32 on a CPU (where BGEM3FlagModel also runs float32); an explicit precision
    wins."""
    if use_bf16:
        warnings.warn("M3Embedder has no bfloat16 graph: use_bf16=True runs as use_fp16=True", UserWarning,
                      stacklevel=3)
        use_fp16 = True
    if use_fp16 is None:
        return precision
    if precision != "auto":
        warnings.warn(f"M3Embedder ignores use_fp16={use_fp16}: precision={precision!r} was given", UserWarning,
                      stacklevel=3)
        return precision
    return "auto" if use_fp16 and CUDA in choose_providers(device) else "fp32"

Lexical = dict[str, float]


class M3Embedder(ModelHandle):
    """bge-m3 without torch: a drop-in for FlagEmbedding's ``BGEM3FlagModel`` (same method names, arguments and
    results), on a folder exported with its heads (``bge-onnx export BAAI/bge-m3 --out DIR``).

    Args:
        model: an exported folder or hub repo id. A dense-only export (the official ``BAAI/bge-m3`` repo's onnx/)
            gives dense vectors; asking it for lexical weights or ColBERT vectors is an error that says so.
        max_length: default token limit of encode and compute_score; default 512, as BGEM3FlagModel's (bge-m3 takes
            up to 8192; memory and time grow with it: see the README's bge-m3 section).
        batch_size, max_tokens: at most this many texts, and padded tokens, per forward pass (texts are sorted by
            length: long texts go alone). Other load options as :class:`bge_onnx.Embedder`.

    BGEM3FlagModel's own constructor arguments are taken too, so that changing the import is enough; each is
    mapped, or refused where bge-onnx cannot do what it asks:

    - ``use_fp16``: with ``precision="auto"``, on CUDA the fp16 graph where the folder has one within its gate (else
      fp32), on a CPU fp32 (where BGEM3FlagModel also runs float32); ``False``: fp32. ``use_bf16=True``: there is no bfloat16 graph; a warning, then as use_fp16.
      An explicit ``precision`` wins (a warning says the other was ignored).
    - ``devices``: "cpu", "cuda", "cuda:0", 0 or a list of one of them; several devices are refused (one
      M3Embedder runs on one device).
    - ``query_instruction_for_retrieval``, ``query_instruction_format``: what :meth:`encode_queries` puts first
      (``format.format(instruction, query)``), in place of the export's instruction (bge-m3 has none).
    - ``query_max_length``, ``passage_max_length``: the default token limits of :meth:`encode_queries` and of
      :meth:`encode` / :meth:`encode_corpus` (``passage_max_length`` is ``max_length``; give one of the two).
    - ``return_dense``, ``return_sparse``, ``return_colbert_vecs``: what :meth:`encode` returns when not told.
    - ``normalize_embeddings=True``, ``pooling_method="cls"``, ``colbert_dim=-1`` (or the export's), and
      ``truncate_dim=None`` are what the export computes; other values are refused, naming why.
    - ``trust_remote_code`` (no code is loaded from a model: no effect) and ``cache_dir`` (the hub cache is
      huggingface_hub's: set ``HF_HUB_CACHE``) are ignored, with a warning when given.

    >>> m3 = M3Embedder("bge-m3-onnx")  # doctest: +SKIP
    >>> out = m3.encode(["What is BGE M3?"], return_sparse=True, return_colbert_vecs=True)  # doctest: +SKIP
    >>> sorted(out)  # doctest: +SKIP
    ['colbert_vecs', 'dense_vecs', 'lexical_weights']
    """

    task = Task.EMBED

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        batch_size: int = 256,
        max_tokens: int | None = None,
        precision: str = "auto",
        revision: str | None = None,
        local_files_only: bool = False,
        normalize_embeddings: bool = True,
        use_fp16: bool | None = None,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | list[str] | list[int] | None = None,
        pooling_method: str = "cls",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
    ) -> None:
        if not normalize_embeddings:
            raise InputError("normalize_embeddings=False is not supported: the export's ColBERT vectors are "
                             "L2-normalised in its graph and its dense vectors in numpy")
        if pooling_method != "cls":
            raise InputError(f"pooling_method={pooling_method!r}: bge-m3 pools the first token (cls), as the export "
                             "does; re-export with --pooling for another")
        if truncate_dim is not None:
            raise InputError(f"truncate_dim={truncate_dim!r} is not supported: cut the vectors yourself "
                             "(vectors[:, :k], then normalise again)")
        for name, value in (("trust_remote_code", trust_remote_code), ("cache_dir", cache_dir)):
            if value:
                why = "no model code is ever loaded" if name == "trust_remote_code" else "set HF_HUB_CACHE instead"
                warnings.warn(f"M3Embedder ignores {name}={value!r}: {why}", UserWarning, stacklevel=2)
        if max_length is not None and passage_max_length is not None and max_length != passage_max_length:
            raise InputError(f"max_length={max_length} and passage_max_length={passage_max_length} are the same "
                             "option (encode's default limit): give one")
        max_length = max_length if max_length is not None else passage_max_length
        device = _device_of(devices, device)
        precision = _precision_of(use_fp16, use_bf16, precision, device)
        super().__init__(model, device=device, threads=threads, max_length=max_length, batch_size=batch_size,
                         max_tokens=max_tokens, precision=precision, revision=revision,
                         local_files_only=local_files_only)
        length = self._model.tokenizer.max_length
        self._setup(length if max_length is not None else min(FLAG_MAX_LENGTH, length))
        if colbert_dim not in (-1, self._heads.get("colbert_dim", -1)):
            given = self._heads.get("colbert_dim")
            raise InputError(f"colbert_dim={colbert_dim}: " + (
                f"the export's ColBERT head gives {given} dimensions" if given else
                "this export has no ColBERT head (dense only)"))
        if query_max_length is not None:
            positive_int("query_max_length", query_max_length)
            if query_max_length > self._model.spec.max_positions:
                raise InputError(f"query_max_length={query_max_length} exceeds what the model can take "
                                 f"({self._model.spec.max_positions} tokens)")
        self._query_max_length = query_max_length
        if query_instruction_for_retrieval is not None:
            form = query_instruction_format.replace("\\n", "\n")  # as BGEM3FlagModel reads a written "\\n"
            try:
                shaped = form.format("\0instruction", "\0query")
            except (IndexError, KeyError, ValueError) as err:
                raise InputError(f"query_instruction_format={query_instruction_format!r} must have two {{}} fields, "
                                 f"the instruction's and the query's: {err}") from None
            if "\0instruction" not in shaped or "\0query" not in shaped:
                raise InputError(f"query_instruction_format={query_instruction_format!r} must place both the "
                                 "instruction and the query (two {} fields)")
            self._instruction = (query_instruction_for_retrieval, form)
        self._returns = {"return_dense": return_dense, "return_sparse": return_sparse,
                         "return_colbert_vecs": return_colbert_vecs}

    def _setup(self, max_length: int) -> None:
        tokenizer = self._model.tokenizer
        self._tokenizers = {tokenizer.max_length: tokenizer}
        self._max_length = max_length
        self._heads = dict(self._model.spec.heads)
        self._skip = np.array(sorted(self._heads.get("skip_ids", ())), dtype=np.int64)
        self._query_max_length: int | None = None
        instruction = self._model.spec.query_instruction
        self._instruction = (instruction, "{}{}") if instruction else None
        self._returns = {"return_dense": True, "return_sparse": False, "return_colbert_vecs": False}

    @property
    def _worker_task(self) -> str:
        return "m3"

    @classmethod
    def sharing(cls, embedder: ModelHandle) -> M3Embedder:
        """An M3Embedder over an Embedder's loaded model (one session, one copy of the weights), with its max
        length (the server serves both from one load)."""
        m3 = cls.__new__(cls)
        m3._attach(embedder._model, name=embedder._name, batch_size=embedder.batch_size,
                   max_tokens=embedder.max_tokens)
        m3._setup(embedder.max_length)
        return m3

    @property
    def max_length(self) -> int:
        """The default token limit of encode and compute_score."""
        return self._max_length

    @property
    def dim(self) -> int:
        return self._model.spec.dim

    def _tokenizer(self, max_length: int | None) -> TextTokenizer:
        length = self._max_length if max_length is None else positive_int("max_length", max_length)
        if length > self._model.spec.max_positions:
            raise InputError(f"max_length={length} exceeds what the model can take "
                             f"({self._model.spec.max_positions} tokens)")
        if length not in self._tokenizers:
            self._tokenizers[length] = TextTokenizer(self._model.folder, max_length=length)
        return self._tokenizers[length]

    def _outputs(self, dense: bool, sparse: bool, colbert: bool) -> list[str]:
        names = [self._model.spec.output] if dense else []
        for wanted, key, what in ((sparse, "lexical", "lexical weights"), (colbert, "colbert", "ColBERT vectors")):
            if wanted and key not in self._heads:
                raise ModelFilesError(
                    f"{self._model.folder} has no {what}: it is a dense-only export (as the official BAAI/bge-m3 "
                    "repo's onnx/). Export the checkpoint with its colbert_linear.pt and sparse_linear.pt: "
                    "`bge-onnx export BAAI/bge-m3 --out DIR`"
                )
            if wanted:
                names.append(self._heads[key])
        return names

    def encode(
        self,
        sentences: str | list[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        show_progress: bool = False,
        workers: int | None = None,
    ) -> dict[str, Any]:
        """Dense vectors, lexical weights and/or ColBERT vectors of texts, from one pass (what to return: by default
        dense only, or what the constructor's return_* said). ``workers``: split the texts over this many
        processes, as :meth:`Embedder.encode` does (not with show_progress).

        Returns:
            ``{"dense_vecs": float32 (n, dim) L2-normalised, "lexical_weights": [{token id as str: weight}],
            "colbert_vecs": [float32 (tokens_i - 1, colbert_dim), L2-normalised rows]}``; an output not asked
            for is None, as in BGEM3FlagModel. For one str: one vector, one dict, one array. Lexical weights keep
            each token id's largest weight, only those > 0, never for the cls, eos, pad and unk ids; ColBERT rows
            are every token after the first (the end token included).

        Raises:
            InputTypeError, InputError (a text that is not UTF-8-encodable), ModelFilesError (lexical or ColBERT
            asked of a dense-only export).
        """
        asked = {"return_dense": return_dense, "return_sparse": return_sparse, "return_colbert_vecs": return_colbert_vecs}
        for name, value in asked.items():
            if value is None:
                asked[name] = value = self._returns[name]
            if not isinstance(value, bool):
                raise InputTypeError(f"{name} must be a bool, got {type(value).__name__} {describe(value)}")
        return_dense, return_sparse, return_colbert_vecs = asked.values()
        single = isinstance(sentences, str)
        items = check_texts([sentences] if single else sentences, name="sentences")
        if self._shares_work(workers, len(items)):
            check_encodable(items, name="sentences")  # here, where the index in the caller's input is known
            out = self._in_workers(workers, "encode", items, {
                "batch_size": batch_size, "max_length": max_length, "return_dense": return_dense,
                "return_sparse": return_sparse, "return_colbert_vecs": return_colbert_vecs})
        else:
            out = self._encode(items, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs,
                               show_progress)
        if single:
            out = {key: None if value is None else value[0] for key, value in out.items()}
        return out

    def encode_queries(self, queries: str | list[str], **options: Any) -> dict[str, Any]:
        """:meth:`encode` for search queries: with the query instruction if there is one (bge-m3 has none; see
        ``query_instruction_for_retrieval``), and ``query_max_length`` as the default limit if it was given."""
        if self._query_max_length is not None and options.get("max_length") is None:
            options["max_length"] = self._query_max_length
        if self._instruction is None:
            return self.encode(queries, **options)
        instruction, form = self._instruction
        single = isinstance(queries, str)
        items = check_texts([queries] if single else queries, name="queries")
        out = self.encode([form.format(instruction, q) for q in items], **options)
        return {key: None if value is None else value[0] for key, value in out.items()} if single else out

    def encode_corpus(self, corpus: str | list[str], **options: Any) -> dict[str, Any]:
        """:meth:`encode` for passages to search in (never an instruction)."""
        return self.encode(corpus, **options)

    def _encode(self, items: list[str], batch_size: int | None, max_length: int | None, dense: bool, sparse: bool,
                colbert: bool, show_progress: bool) -> dict[str, Any]:
        names = self._outputs(dense, sparse, colbert)
        batch_size = self.batch_size if batch_size is None else positive_int("batch_size", batch_size)
        tokenizer = self._tokenizer(max_length)
        vectors = np.zeros((len(items), self.dim), dtype=np.float32)
        lexical: list[Lexical] = [{} for _ in items]
        multi: list[np.ndarray] = [np.zeros((0, self._heads.get("colbert_dim", 0)), np.float32) for _ in items]
        progress = Progress(len(items), label="embedded", enabled=show_progress)
        session, pad_id = self._model.session, self._model.spec.pad_token_id

        def tokenize(chunk: Sequence[str], start: int) -> tuple[list[Encoding], int]:
            return tokenizer.encode_texts(list(chunk), name="sentences", start=start)

        truncated = 0
        # as Embedder: tokenised chunk by chunk (each sorted by length on its own), so a large input's encodings
        # are never all held at once
        for at, encodings, cut in tokenize_ahead(items, tokenize, ahead=False):
            truncated += cut
            for rows, feeds in sorted_batches(encodings, pad_id=pad_id, input_names=session.input_names,
                                              batch_size=batch_size, max_tokens=self.max_tokens):
                outputs = iter(session.run_outputs(names, feeds))
                pooled = self._reduce(next(outputs), feeds) if dense else None  # official graphs: pooled here
                weights = next(outputs) if sparse else None
                tokens = next(outputs) if colbert else None
                for k, row in enumerate(rows):
                    i, n = at + row, len(encodings[row])
                    if pooled is not None:
                        vectors[i] = pooled[k]
                    if weights is not None:
                        lexical[i] = self._lexical(feeds["input_ids"][k, :n], weights[k, :n])
                    if tokens is not None:
                        multi[i] = np.array(tokens[k, : n - 1], dtype=np.float32)
                progress.advance(len(rows))
        warn_truncated(truncated, len(items), tokenizer.max_length, "sentences")
        return {
            "dense_vecs": l2_normalize(vectors) if dense else None,
            "lexical_weights": lexical if sparse else None,
            "colbert_vecs": multi if colbert else None,
        }

    def _lexical(self, ids: np.ndarray, weights: np.ndarray) -> Lexical:
        """Token id (str) -> its largest weight in the text, for weights > 0 and ids not skipped; in the order the
        ids first occur (as BGEM3FlagModel's dicts, which convert_id_to_token's collisions depend on)."""
        keep = (weights > 0) & ~np.isin(ids, self._skip)
        unique, first, where = np.unique(ids[keep], return_index=True, return_inverse=True)
        best = np.zeros(len(unique), dtype=np.float32)
        np.maximum.at(best, where, weights[keep].astype(np.float32))
        order = np.argsort(first)
        return dict(zip(map(str, unique[order].tolist()), best[order].tolist()))

    def compute_lexical_matching_score(self, lexical_weights_1: Lexical | list[Lexical],
                                       lexical_weights_2: Lexical | list[Lexical]) -> float | np.ndarray:
        """Sum over the token ids two texts share of the product of their weights; for two lists, the (n1, n2)
        matrix of every pair."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return lexical_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[lexical_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1],
                            dtype=np.float32)
        raise InputTypeError("give two lexical weight dicts, or two lists of them; got "
                             f"{type(lexical_weights_1).__name__} and {type(lexical_weights_2).__name__}")

    def colbert_score(self, q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """ColBERT late interaction: the mean over query vectors of their largest dot product with a passage vector."""
        return colbert_score(q_reps, p_reps)

    def convert_id_to_token(self, lexical_weights: Lexical | list[Lexical]) -> Lexical | list[Lexical]:
        """Lexical weights keyed by the token's text instead of its id (ids that decode alike: the last one wins,
        as in BGEM3FlagModel); a dict for a dict, a list for a list."""
        decode = self._model.tokenizer.decode_id
        if isinstance(lexical_weights, dict):
            return {decode(int(i)): w for i, w in lexical_weights.items()}
        return [{decode(int(i)): w for i, w in weights.items()} for weights in lexical_weights]

    def compute_score(
        self,
        sentence_pairs: tuple[str, str] | list[tuple[str, str]],
        *,
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
        show_progress: bool = False,
        workers: int | None = None,
    ) -> dict[str, list[float] | float]:
        """Dense, lexical ("sparse") and ColBERT scores of (query, passage) pairs, and their weighted sums, as
        BGEM3FlagModel.compute_score: ``weights_for_different_modes`` = [dense, sparse, colbert] (default 1, 1, 1);
        "sparse+dense" = (w1 sparse + w0 dense) / (w0 + w1), "colbert+sparse+dense" = (w2 colbert + w1 sparse +
        w0 dense) / (w0 + w1 + w2). ``show_progress``: a counter for the queries, then one for the passages;
        ``workers``: as for :meth:`encode`.

        Returns:
            ``{"colbert": [...], "sparse": [...], "dense": [...], "sparse+dense": [...],
            "colbert+sparse+dense": [...]}``, one float per pair (a float for a single pair).
        """
        single = isinstance(sentence_pairs, tuple) and len(sentence_pairs) == 2 and all(
            isinstance(part, str) for part in sentence_pairs)
        pairs = check_pairs([sentence_pairs] if single else sentence_pairs)
        weights = [1.0, 1.0, 1.0] if weights_for_different_modes is None else list(weights_for_different_modes)
        if len(weights) != 3 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise InputError("weights_for_different_modes must be 3 numbers [dense, sparse, colbert], got "
                             f"{describe(weights_for_different_modes)}")
        if sum(weights) <= 0 or weights[0] + weights[1] <= 0:
            raise InputError(f"weights_for_different_modes must have positive sums, got {weights}")
        modes = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True, "batch_size": batch_size,
                 "show_progress": show_progress, "workers": workers}
        if max_query_length is None:  # as BGEM3FlagModel: the constructor's query_max_length, else encode's limit
            max_query_length = self._query_max_length
        queries = self.encode([q for q, _ in pairs], max_length=max_query_length, **modes)
        passages = self.encode([p for _, p in pairs], max_length=max_passage_length, **modes)
        dense = np.sum(queries["dense_vecs"] * passages["dense_vecs"], axis=1).tolist() if pairs else []
        sparse = [lexical_score(q, p) for q, p in zip(queries["lexical_weights"], passages["lexical_weights"])]
        multi = [colbert_score(q, p) for q, p in zip(queries["colbert_vecs"], passages["colbert_vecs"])]
        w0, w1, w2 = weights
        scores = {
            "colbert": multi,
            "sparse": sparse,
            "dense": dense,
            "sparse+dense": [(s * w1 + d * w0) / (w0 + w1) for s, d in zip(sparse, dense)],
            "colbert+sparse+dense": [(c * w2 + s * w1 + d * w0) / (w0 + w1 + w2)
                                     for c, s, d in zip(multi, sparse, dense)],
        }
        return {key: value[0] for key, value in scores.items()} if single else scores


def lexical_score(a: Lexical, b: Lexical) -> float:
    """Sum over shared token ids of the product of their weights (0.0 when none are shared)."""
    if len(b) < len(a):
        a, b = b, a
    return float(sum(w * b[t] for t, w in a.items() if t in b))


def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
    """Mean over the query's vectors of the largest dot product with any passage vector."""
    q, p = np.asarray(q_reps, dtype=np.float32), np.asarray(p_reps, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise InputError(f"colbert_score needs two 2-D arrays of the same width, got shapes {q.shape} and {p.shape}")
    if not len(q) or not len(p):
        return 0.0
    return float((q @ p.T).max(axis=1).sum() / len(q))
