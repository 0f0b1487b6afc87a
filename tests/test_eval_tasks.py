"""Benchmark loaders on fixtures written in each benchmark's exact public format, and their bad-input errors."""

import csv
import json

import pytest

from illada_lightning.evaluation import EvalConfig, get_task, registered_tasks
from illada_lightning.evaluation.formats import hellaswag_preprocess
from illada_lightning.evaluation.records import EvalDataError
from illada_lightning.evaluation.tasks import UnknownTaskError


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(task, path, **cfg):
    return get_task(task).examples(EvalConfig(tasks=[task], data={task: str(path)}, **cfg))


HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to clean a roof [title] Get a ladder.", "ctx_b": "",
     "ctx": "[header] How to clean a roof [title] Get a ladder. ", "split": "val", "split_type": "zeroshot",
     "label": "1", "endings": ["[step] Lean it  against the wall.", "[substeps] Climb up [title] carefully.",
                               "Eat it.", "Paint the sky."], "source_id": "wikihow~1"},
]


def test_hellaswag_loader_cleans_bracketed_artefacts(tmp_path):
    examples = load("hellaswag", write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG))
    first, second = examples
    # ctx_a + " " + ctx_b capitalised, with the activity label first.
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.continuations[3] == " starts pulling up roofing on a roof."
    assert first.gold == 3
    assert second.context == "Home and Garden: How to clean a roof. Get a ladder."
    assert second.continuations[:2] == [" Lean it against the wall.", " Climb up. carefully."]
    assert second.gold == 1  # label given as a string in some releases
    assert second.where.endswith("hellaswag_val.jsonl:2")


def test_hellaswag_preprocess_matches_the_harness_rules():
    assert hellaswag_preprocess(" A [title] B [step] C  D ") == "A. B C D"


ARC_NUMERIC = {
    "id": "Mercury_7220990",
    "question": {"stem": "Which process moves water from the ground into the air?",
                 "choices": [{"text": "condensation", "label": "1"}, {"text": "precipitation", "label": "2"},
                             {"text": "runoff", "label": "3"}, {"text": "evaporation", "label": "4"},
                             {"text": "freezing", "label": "5"}]},
    "answerKey": "4",
}
ARC_LETTERS = {
    "id": "ACTAAP_2013_7_4",
    "question": {"stem": "What is the main source of energy for Earth?",
                 "choices": [{"text": "the Moon", "label": "A"}, {"text": "the Sun", "label": "B"},
                             {"text": "wind", "label": "C"}]},
    "answerKey": "B",
}


def test_arc_loader_with_numeric_keys_and_five_choices(tmp_path):
    examples = load("arc_challenge", write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [ARC_NUMERIC, ARC_LETTERS]))
    assert examples[0].context == "Question: Which process moves water from the ground into the air?\nAnswer:"
    assert len(examples[0].continuations) == 5
    assert examples[0].gold == 3 and examples[0].continuations[3] == " evaporation"
    assert examples[1].gold == 1 and len(examples[1].continuations) == 3


def test_arc_fewshot_comes_from_the_train_split_beside_the_test_file(tmp_path):
    test = write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [ARC_NUMERIC])
    write_jsonl(tmp_path / "ARC-Easy-Train.jsonl", [ARC_LETTERS])
    (example,) = load("arc_easy", test, num_fewshot=1)
    assert example.context == (
        "Question: What is the main source of energy for Earth?\nAnswer: the Sun\n\n"
        "Question: Which process moves water from the ground into the air?\nAnswer:"
    )


def test_piqa_labels_come_from_the_separate_file(tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [
        {"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material."},
        {"goal": "dresser", "sol1": "can hold a blanket", "sol2": "can hold a car"},
    ])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    examples = load("piqa", path)
    assert [e.gold for e in examples] == [0, 1]
    assert examples[1].context == "Question: dresser\nAnswer:"
    assert examples[1].continuations == [" can hold a blanket", " can hold a car"]


def test_piqa_without_its_labels_file_names_it(tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(EvalDataError, match="valid-labels.lst"):
        load("piqa", path)


def test_mmlu_csv_file_and_directory(tmp_path):
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "astronomy_test.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([
            ["What is true for a type-Ia (\"type one-a\") supernova?", "This type occurs in binary systems.",
             "This type occurs in young galaxies.", "This type produces gamma-ray bursts.",
             "This type produces high amounts of X-rays.", "A"],
            ["Why is Mars red?", "Rust, i.e. iron oxide", "Blood", "Lava", "Paint", "A"],
            ["2 + 2 =", "3", "4", "5", "22", "B"],
        ])
    examples = load("mmlu", path)
    assert [e.gold for e in examples] == [0, 0, 1]
    assert examples[1].context == "Why is Mars red?\nA. Rust, i.e. iron oxide\nB. Blood\nC. Lava\nD. Paint\nAnswer:"
    assert examples[1].continuations == [" A", " B", " C", " D"]
    assert len(load("mmlu", tmp_path / "test")) == 3  # a directory of <subject>_test.csv files


GSM8K_TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]
GSM8K_TEST = [
    {"question": "Janet has 1,000 ducks. She sells 250. How many are left?",
     "answer": "1000 - 250 = <<1000-250=750>>750\n#### 750"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
               "bolts of fabric\n#### 3"},
]


def test_gsm8k_loader_fewshot_prompt_and_reference(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_TRAIN)
    examples = load("gsm8k", write_jsonl(tmp_path / "test.jsonl", GSM8K_TEST), num_fewshot=2)
    assert [e.target for e in examples] == ["750", "3"]
    prompt = examples[0].prompt
    assert prompt.count("Question:") == 3 and prompt.endswith(f"Question: {GSM8K_TEST[0]['question']}\nAnswer:")
    assert "<<" not in prompt and "#### 72" in prompt and "#### 10" in prompt  # calculator notes stripped
    # The chat form: few-shot solutions as earlier turns, the question last.
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant", "user", "assistant", "user"]
    zero = load("gsm8k", tmp_path / "test.jsonl", num_fewshot=0)
    assert zero[1].prompt == f"Question: {GSM8K_TEST[1]['question']}\nAnswer:"


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file_names_path_and_expected_format(tmp_path):
    missing = tmp_path / "nowhere" / "hellaswag_val.jsonl"
    with pytest.raises(EvalDataError) as err:
        load("hellaswag", missing)
    message = str(err.value)
    assert str(missing) in message and "expected" in message and "'endings'" in message
    assert "data.hellaswag=PATH" in message


def test_record_missing_a_field_names_file_and_line(tmp_path):
    bad = dict(ARC_LETTERS)
    del bad["answerKey"]
    path = write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [ARC_NUMERIC, bad])
    with pytest.raises(EvalDataError, match=r"ARC-Challenge-Test.jsonl:2: record has no field 'answerKey'"):
        load("arc_challenge", path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_TEST[0]) + "\n{not json\n")
    with pytest.raises(EvalDataError, match=r"test.jsonl:2: malformed JSON"):
        load("gsm8k", path, num_fewshot=0)


@pytest.mark.parametrize("task, name, record, pattern", [
    ("hellaswag", "hellaswag_val.jsonl", {**HELLASWAG[0], "label": 7}, "label out of range: 7 for 4 choices"),
    ("arc_challenge", "ARC-Challenge-Test.jsonl", {**ARC_LETTERS, "answerKey": "E"},
     r"answerKey 'E' is not one of the choice labels \['A', 'B', 'C'\]"),
])
def test_label_out_of_range(tmp_path, task, name, record, pattern):
    path = write_jsonl(tmp_path / name, [record])
    with pytest.raises(EvalDataError, match=rf"{name}:1: .*{pattern}"):
        load(task, path)


def test_mmlu_bad_answer_letter_and_short_row(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text("q,a,b,c,d,E\n")
    with pytest.raises(EvalDataError, match=r"x_test.csv:1: label out of range"):
        load("mmlu", path)
    path.write_text("q,a,b,c\n")
    with pytest.raises(EvalDataError, match=r"x_test.csv:1: expected 6 columns"):
        load("mmlu", path)


def test_gsm8k_answer_without_final_number(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(EvalDataError, match=r"test.jsonl:1: field 'answer' has no final number"):
        load("gsm8k", path, num_fewshot=0)


def test_unregistered_task_lists_the_registered_ones():
    with pytest.raises(UnknownTaskError) as err:
        get_task("hellaswagg")
    assert "hellaswagg" in str(err.value)
    for name in registered_tasks():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="registered tasks: arc_challenge"):
        EvalConfig(tasks=["nope"]).validate()
