import pytest

from pipeline.text.answer_end import find_stop, trim_answer


@pytest.mark.parametrize("ramble", [
    "\n\nExercise 3: Calculate the interest on a loan.",
    "\nQuestion: What happens to bonds?",
    "\nInstruct: Write a poem.\nOutput:",
    "\nFollow-up questions:\n1. Why?",
    "\n\nFollow up question 2: And then?",
    "\n## Exercise 1:\nSomething",
    "<|endoftext|>Another document",
])
def test_answer_is_cut_where_phi2_starts_inventing_a_new_turn(ramble):
    answer = "Higher rates make loans more expensive.\nSo firms invest less."
    assert trim_answer(answer + ramble) == (answer, True)


def test_answer_without_ramble_is_kept_whole():
    text = "Higher rates make loans more expensive. The question: who pays? Usually borrowers."
    assert trim_answer(text) == (text, False)


def test_a_label_before_any_answer_text_is_not_a_stop():
    assert find_stop("Question: is this the answer?") is None


def test_stop_words_inside_a_line_do_not_stop():
    assert find_stop("We did an exercise: saving money.\nThen we answered a question:") is None
