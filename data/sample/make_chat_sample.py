"""Writes chat_vi.jsonl.xz: two-turn translation conversations from the bundled Tatoeba pairs.

    python data/sample/make_chat_sample.py

Deterministic. Conversation k takes pairs 2k and 2k+1; its turns ask for a translation one way,
then the other; every fifth starts with a system message.
"""

import json
import lzma
from pathlib import Path

HERE = Path(__file__).parent
ASK = {"vi": "Dịch sang tiếng Việt: {}", "en": "Translate into English: {}"}


def main() -> None:
    english = lzma.open(HERE / "tatoeba.en.xz", "rt", encoding="utf-8").read().splitlines()
    vietnamese = lzma.open(HERE / "tatoeba.vi.xz", "rt", encoding="utf-8").read().splitlines()
    pairs = list(zip(english, vietnamese))
    with lzma.open(HERE / "chat_vi.jsonl.xz", "wt", encoding="utf-8") as out:
        for k in range(len(pairs) // 2):
            messages = []
            if k % 5 == 0:
                messages.append({"role": "system", "content": "Bạn là một trợ lý dịch thuật Anh–Việt."})
            for turn, (en, vi) in enumerate(pairs[2 * k:2 * k + 2]):
                to_vietnamese = (k + turn) % 2 == 0
                question, answer = (en, vi) if to_vietnamese else (vi, en)
                messages.append({"role": "user", "content": ASK["vi" if to_vietnamese else "en"].format(question)})
                messages.append({"role": "assistant", "content": answer})
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
