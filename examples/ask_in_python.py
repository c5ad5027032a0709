"""Ask one question through the Python API and print both languages.

    python examples/ask_in_python.py "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？"

Models default to microsoft/phi-2, Helsinki-NLP/opus-mt-ja-en and staka/fugumt-en-ja (downloaded on
first use, about 6 GB), or to BILINGUAL_QA_LLM/JA_EN/EN_JA; pass local directories with
--llm/--ja-en/--en-ja to run offline (`bilingual-qa tiny-models` makes tiny ones to try it with).
"""

import argparse

from pipeline import BilingualQA, GenerationSettings, Translator
from pipeline.quiet import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("question")
    parser.add_argument("--llm")
    parser.add_argument("--ja-en")
    parser.add_argument("--en-ja")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--quiet", action="store_true", help="only errors on stderr")
    args = parser.parse_args()
    # As the command line does: the libraries' progress bars on a terminal only (not in a pipe or a
    # log, where our own "loading ..." lines say the same), and with --quiet no status line at all.
    with quiet_libraries(args.quiet):
        ask(args)


def ask(args: argparse.Namespace) -> None:
    qa = BilingualQA.from_pretrained(llm=args.llm, ja_en=args.ja_en, en_ja=args.en_ja)
    result = qa.ask(args.question, settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    print(result.render("text"))
    print(f"finish: {result.finish_reason}, seconds per stage: {result.timings}")

    # A translator works alone too; the pipeline's own one is reused here, no second load.
    translator: Translator = qa.en_ja
    print(translator.translate(["Diversification spreads risk.", "- Save early.\n- Spend less."]))


if __name__ == "__main__":
    main()
