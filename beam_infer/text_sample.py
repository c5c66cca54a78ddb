"""A generated corpus of texts: the embed job's built-in sample and its benchmark's data.

Lengths are log-normal in tokens (a few to a few hundred, as in a web or support-ticket corpus); the words come
from a fixed English vocabulary, with one text in eight in another script (CJK, Arabic, Cyrillic, emoji). Every
text is a function of (seed, index).
"""

from __future__ import annotations

import json
import os

import numpy as np

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out up about time into "
    "only some could them other then its now than two like these first may any new after very most also made did "
    "many over such where must through back years much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might great old year off come since against go came right used take "
    "three engine batch model queue worker stream window token budget signal parquet storage cluster"
).split()
_OTHER_SCRIPTS = (
    "機械学習のモデルは大量のテキストを処理します", "我们在图形处理器上运行批量推理",
    "مرحبا بالعالم هذا نص قصير للاختبار",
    "Быстрая коричневая лиса прыгает через ленивую собаку", "결과는 파일에 기록됩니다", "🚀 shipped 🎉 fast ✅ done",
)


def generated_texts(count: int, seed: int = 0, median_words: float = 45.0, max_words: int = 400) -> list[str]:
    """`count` texts with log-normal word counts (median `median_words`, 3 to `max_words`)."""
    rng = np.random.default_rng(seed)
    words = np.clip(np.round(rng.lognormal(np.log(median_words), 0.9, count)), 3, max_words).astype(int)
    texts = []
    for i, n in enumerate(words):
        picked = rng.integers(0, len(_WORDS), n)
        text = " ".join(_WORDS[j] for j in picked).capitalize() + "."
        if i % 8 == 7:
            text = f"{_OTHER_SCRIPTS[i // 8 % len(_OTHER_SCRIPTS)]} {text}"
        texts.append(text)
    return texts


def write_text_sample(directory: str, count: int, seed: int = 0) -> str:
    """Writes `count` generated texts as `<directory>/texts.jsonl` ({"id", "text"} per line); returns its path."""
    path = os.path.join(directory, "texts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(generated_texts(count, seed)):
            f.write(json.dumps({"id": f"t{i:06d}", "text": text}, ensure_ascii=False) + "\n")
    return path
