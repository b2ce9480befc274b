"""Eval prompts string-exact: MMLU's few-shot prompt, BIG-bench's with its task-file fields and
the seeded choice order that hides where a file lists the answer."""

from __future__ import annotations

from collections import Counter

from conftest import BIGBENCH_FIXTURES, real_bigbench_task

from rlora_cli.data.bigbench import bigbench_prompt, choice_order, load_bigbench
from rlora_cli.eval.benchmarks import mmlu_prompt

BIGBENCH = BIGBENCH_FIXTURES


def test_mmlu_prompt_two_shot_is_string_exact():
    shots = [{"question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1},
             {"question": "Which is red?", "choices": ["sky", "grass", "blood", "snow"], "answer": 2}]
    question = {"question": "Which is a planet?", "choices": ["Mars", "Moon", "Sun", "Comet"], "answer": 0}
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is red?\nA. sky\nB. grass\nC. blood\nD. snow\nAnswer: C\n\n"
        "Which is a planet?\nA. Mars\nB. Moon\nC. Sun\nD. Comet\nAnswer:"
    )
    assert mmlu_prompt("high_school_physics", question, shots) == expected


def test_bigbench_prompt_defaults_choices_and_shots():
    task = {"task_prefix": "Pick one.\n"}
    shot = {"input": "2+2?", "target_scores": {"3": 0, "4": 1}}
    example = {"input": "1+1?", "target_scores": {"2": 1, "5": 0}}
    # choices in choice_order: shuffled, seeded by the input
    assert bigbench_prompt(task, example, [shot]) == (
        "Pick one.\n"
        "\nQ: 2+2?\n  choice: 4\n  choice: 3\nA: 4"
        "\n"
        "\nQ: 1+1?\n  choice: 5\n  choice: 2\nA: ")
    assert bigbench_prompt({}, {"input": "Say hi", "target": ["hi", "hello"]}, []) == "\nQ: Say hi\nA: "


def check_choice_order_hides_the_first_position(examples: list[dict]) -> None:
    """Examples whose file lists the answer first, always, among four choices."""
    best = [max(e["target_scores"], key=e["target_scores"].get) for e in examples]
    assert all(list(e["target_scores"])[0] == b for e, b in zip(examples, best))
    orders = [choice_order(e) for e in examples]
    assert all(sorted(o) == sorted(e["target_scores"]) for o, e in zip(orders, examples))  # a permutation
    assert orders == [choice_order(e) for e in examples]  # deterministic
    positions = Counter(o.index(b) for o, b in zip(orders, best))
    assert len(positions) == 4 and max(positions.values()) < 0.4 * len(examples)


def test_choice_order_is_a_seeded_shuffle_that_hides_the_file_position():
    task = load_bigbench(BIGBENCH / "answer_first" / "task.json")  # the file lists the answer first, always
    check_choice_order_hides_the_first_position(task["examples"])
    assert bigbench_prompt(task, task["examples"][0], []) == (  # the prompt lists the shuffled order
        "Choose the SI unit of the quantity named in each question.\n\n"
        "\nQ: What is the SI unit of electric current?"
        "\n  choice: pascal\n  choice: volt\n  choice: kelvin\n  choice: ampere\nA: ")


def test_choice_order_on_the_real_physics_task():
    """physics lists the answer first in all of its 229 examples."""
    check_choice_order_hides_the_first_position(load_bigbench(real_bigbench_task("physics"))["examples"])


def test_bigbench_prompt_task_prefixes_without_appended_choices():
    task = {"task_prefix": "T:", "example_input_prefix": "\nStatement: ",
            "example_output_prefix": " Answer: ", "append_choices_to_input": False, "choice_prefix": " | "}
    shots = [{"input": "a", "target": "x", "target_scores": {"y": 1, "x": 0}}]  # `target` wins for shots
    assert bigbench_prompt(task, {"input": "b", "target_scores": {"x": 1}}, shots) == (
        "T:\nStatement: a Answer: x\n\nStatement: b Answer: ")


def test_bigbench_prompt_task_file_fields():
    task = load_bigbench(BIGBENCH / "plausibility" / "task.json")  # its own prefixes, choices not appended
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, []) == (
        "Say whether each statement describes something that could really happen:"
        "\nClaim: The swimmer finished the last lap on horseback.\nPossible or impossible? ")
    assert bigbench_prompt(task, ex, [shot]) == (
        "Say whether each statement describes something that could really happen:"
        "\nClaim: The goalkeeper caught the ball with both hands.\nPossible or impossible? possible"
        "\n"
        "\nClaim: The swimmer finished the last lap on horseback.\nPossible or impossible? ")
    task = load_bigbench(BIGBENCH / "several_correct" / "task.json")  # its own choice prefix and separator
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, [shot]) == (  # the shot shows the first best-scored choice in file order
        "Pick an answer that fits.\n"
        "\nQ: Which of these numbers is even?\n  option: 9\n  option: 10\n  option: 4\n  option: 7\nA: 4"
        "\n\n"
        "\nQ: Which animal can fly?\n  option: trout\n  option: bat\n  option: cat\n  option: sparrow\nA: ")
    task = load_bigbench(BIGBENCH / "count_items" / "task.json")  # free-form: a shot shows the first target
    shot, ex = task["examples"][:2]
    assert bigbench_prompt(task, ex, [shot]) == (
        "\nQ: I packed a towel, two books and a hat. How many things did I pack?\nA: 4"
        "\n"
        "\nQ: On the shelf are a clock and a vase. How many objects are on the shelf?\nA: ")
