import json

import pytest
import torch

from mtllm_train.config import ConfigError
from mtllm_train.model.tokenizers import load_tokenizer
from mtllm_train.portable.tokens import language_codes, pad_id, set_source_language
from mtllm_train.portable.heads import ClassificationHead, MultipleChoiceHead, span_pool
from mtllm_train.tasks.languages import BENCHMARKS, resolve


@pytest.fixture(scope="module")
def mt_codes():
    return language_codes(load_tokenizer("configs/tiny/mt_tokenizer", "model.mt_tokenizer"))


def test_every_table_code_is_an_nllb_code(mt_codes):
    assert len(mt_codes) == 202
    for benchmark, table in BENCHMARKS.items():
        for code, flores in table.items():
            assert flores is None or flores in mt_codes, (benchmark, code, flores)


def test_greek_is_ell_grek_and_wrong_codes_are_refused(mt_codes):
    assert resolve("el", "xnli", mt_codes) == "ell_Grek"
    assert resolve("ell_Grek", "belebele", mt_codes) == "ell_Grek"
    with pytest.raises(ConfigError, match=r"language 'ell_Latn' is not a belebele language"):
        resolve("ell_Latn", "belebele", mt_codes)
    with pytest.raises(ConfigError, match=r"language 'xx' is not a xnli language"):
        resolve("xx", "xnli", mt_codes)
    # A benchmark of one's own (issue 30): FLORES-200 codes, checked, a close match suggested.
    assert resolve("eng_Latn", "glue", mt_codes) == "eng_Latn"
    with pytest.raises(ConfigError, match=r"language 'en' of glue: not a FLORES-200 code of the MT tokenizer "
                                          r"\(did you mean eng_Latn\?\)"):
        resolve("en", "glue", mt_codes)


def test_languages_without_an_nllb_code_need_an_explicit_fallback(mt_codes):
    with pytest.raises(ConfigError, match=r"language 'nij' of nusax has no NLLB-200 code; give an explicit fallback"):
        resolve("nij", "nusax", mt_codes)
    assert resolve("nij", "nusax", mt_codes, {"nij": "ind_Latn"}) == "ind_Latn"
    with pytest.raises(ConfigError, match=r"'ind_Grek' \(the fallback for 'nij'\) is not a language code"):
        resolve("nij", "nusax", mt_codes, {"nij": "ind_Grek"})


def test_multiple_span_pools_each_choice_over_its_own_span():
    head = MultipleChoiceHead(2)
    head.linear.weight.data = torch.tensor([[1.0, 0.0]])
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [10.0, 0.0], [20.0, 0.0], [99.0, 0.0]]])
    span_masks = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]])
    torch.testing.assert_close(head(span_pool(hidden, span_masks)), torch.tensor([[2.0, 15.0, 99.0]]))


def test_classification_head_has_no_bias():
    head = ClassificationHead(4, 3)
    assert set(head.state_dict()) == {"linear.weight"}  # what a checkpoint and an export hold
    assert torch.equal(head(torch.zeros(2, 4)), torch.zeros(2, 3)) and head(torch.ones(2, 4)).shape == (2, 3)


def test_s_dev_and_t_dev_pick_the_right_checkpoints():
    from mtllm_train.tasks.selection import markdown_table, select

    # Validated at 3 steps. English dev peaks at 200; German dev at 300; Swahili dev ties at 100 and 300.
    dev = {100: {"en": 0.80, "de": 0.60, "sw": 0.50}, 200: {"en": 0.85, "de": 0.62, "sw": 0.40},
           300: {"en": 0.84, "de": 0.70, "sw": 0.50}}
    test = {100: {"de": 0.61, "sw": 0.52}, 200: {"de": 0.63, "sw": 0.41}, 300: {"de": 0.69, "sw": 0.49}}
    selection = select(dev, test, source="en")
    assert selection["s_dev"] == {"step": 200, "test": {"de": 0.63, "sw": 0.41}}
    assert selection["t_dev"] == {"de": {"step": 300, "test": 0.69}, "sw": {"step": 100, "test": 0.52}}
    table = markdown_table(selection)
    assert "| S-DEV | 63.0 | 41.0 | 52.0 |" in table and "| T-DEV | 69.0 | 52.0 | 60.5 |" in table


def test_selection_needs_test_scores_only_where_it_lands():
    from mtllm_train.tasks.selection import needed_tests, select

    dev = {100: {"en": 0.8, "de": 0.7}, 200: {"en": 0.9, "de": 0.6}, 300: {"en": 0.7, "de": 0.5}}
    assert needed_tests(dev, "en", ["de"]) == {200: {"de"}, 100: {"de"}}
    assert select(dev, {100: {"de": 0.65}, 200: {"de": 0.55}}, "en", ["de"])["t_dev"]["de"] == {"step": 100, "test": 0.65}
    with pytest.raises(ConfigError, match=r"no test score for 'de' at step 200, the S-DEV checkpoint"):
        select(dev, {100: {"de": 0.65}}, source="en", languages=["de"])


def test_task_files_in_three_formats(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtllm_train.tasks.data import read_task_file

    (tmp_path / "nli.jsonl").write_text(json.dumps({"premise": "A man sleeps.", "hypothesis": "He is awake.",
                                                    "label": "contradiction"}) + "\n")
    assert read_task_file(tmp_path / "nli.jsonl", "nli") == [
        {"premise": "A man sleeps.", "hypothesis": "He is awake.", "label": 2}]
    (tmp_path / "sent.csv").write_text("text,label\nGreat film,1\nDull,0\n")
    assert [e["label"] for e in read_task_file(tmp_path / "sent.csv", "sentiment", ("negative", "positive"))] == [1, 0]
    pq.write_table(pa.table({"flores_passage": ["P"], "question": ["Q?"], "mc_answer1": ["a"], "mc_answer2": ["b"],
                             "mc_answer3": ["c"], "mc_answer4": ["d"], "correct_answer_num": ["3"]}),
                   tmp_path / "belebele.parquet")
    assert read_task_file(tmp_path / "belebele.parquet", "belebele") == [
        {"passage": "P", "question": "Q?", "answers": ["a", "b", "c", "d"], "label": 2}]


def test_bad_task_rows_name_the_file_and_line(tmp_path):
    from mtllm_train.tasks.data import read_task_file

    (tmp_path / "bad.csv").write_text("text,label\nfine,1\nbroken,7\n")
    with pytest.raises(ConfigError, match=r"bad.csv:3: label 7 is outside 0..1"):
        read_task_file(tmp_path / "bad.csv", "sentiment", ("negative", "positive"))
    (tmp_path / "nli.jsonl").write_text('{"premise": "x", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"nli.jsonl:1: no hypothesis field"):
        read_task_file(tmp_path / "nli.jsonl", "nli")


def test_best_step_takes_the_highest_score_and_the_earliest_of_ties():
    from mtllm_train.tasks.selection import best_step

    dev = {10: {"en": 0.5}, 20: {"en": 0.7}, 30: {"en": 0.7}, 40: {"en": 0.6}}
    assert best_step(dev, "en") == 20
    with pytest.raises(ConfigError, match="no dev score for language 'de'"):
        best_step(dev, "de")


@pytest.mark.parametrize("view, key", [("llm", "model.llm_tokenizer"), ("mt", "model.mt_tokenizer")])
def test_an_inline_model_without_its_tokenizer_is_one_config_error_everywhere(tiny_cfg, view, key):
    """Stage 1, stage 2 and export ask the same helper which tokenizer a view reads."""
    from mtllm_train.model.tokenizers import tokenizer_spec, view_tokenizer
    from mtllm_train.tasks.encode import TaskData

    setattr(tiny_cfg.model, key.split(".")[1], "")
    assert tokenizer_spec(tiny_cfg.model, "llm" if view == "mt" else "mt")  # the other view is still named
    for attempt in (lambda: view_tokenizer(tiny_cfg.model, view), lambda: TaskData(tiny_cfg)):
        with pytest.raises(ConfigError, match=rf"{key}: required when model\.\w+ is an inline config"):
            attempt()


def test_label_names_match_whatever_the_capitals():
    from mtllm_train.tasks.data import _label

    assert _label("Positive", ("Negative", "Positive"), "f:1") == 1
    assert _label("negative ", ("Negative", "Positive"), "f:1") == 0
    assert _label("POSITIVE", ("negative", "positive"), "f:1") == 1
    with pytest.raises(ConfigError, match=r"f:1: label 'neutral' is not one of Negative, Positive"):
        _label("neutral", ("Negative", "Positive"), "f:1")


def test_aggregate_over_seeds_gives_the_mean_and_sample_std_per_language_and_of_the_average(tmp_path):
    from mtllm_train.tasks.aggregate import aggregate

    s_dev = [{"deu_Latn": 0.50, "fra_Latn": 0.70}, {"deu_Latn": 0.60, "fra_Latn": 0.80}, {"deu_Latn": 0.70, "fra_Latn": 0.60}]
    t_dev = [{"deu_Latn": 0.55, "fra_Latn": 0.75}, {"deu_Latn": 0.65, "fra_Latn": 0.85}, {"deu_Latn": 0.75, "fra_Latn": 0.65}]
    runs = []
    for seed, (s, t) in enumerate(zip(s_dev, t_dev)):
        results = tmp_path / f"row_s{seed}" / "results"
        results.mkdir(parents=True)
        selection = {"s_dev": {"step": 3, "test": s}, "t_dev": {lang: {"step": 6, "test": v} for lang, v in t.items()}}
        (results / "stack_s1_s2.json").write_text(json.dumps({"metric": "accuracy", "selection": selection}))
        runs.append(str(tmp_path / f"row_s{seed}"))
    table = aggregate(runs, str(tmp_path / "row"))["stack_s1_s2"]
    # By hand: deu 0.5, 0.6, 0.7 -> mean 0.6, sample std 0.1; run averages 0.6, 0.7, 0.65 -> mean 0.65, std 0.05.
    assert table["s_dev"]["languages"]["deu_Latn"] == pytest.approx({"mean": 0.6, "std": 0.1, "runs": 3})
    assert table["s_dev"]["average"] == pytest.approx({"mean": 0.65, "std": 0.05, "runs": 3})
    assert table["t_dev"]["languages"]["fra_Latn"] == pytest.approx({"mean": 0.75, "std": 0.1, "runs": 3})
    markdown = (tmp_path / "row.md").read_text()
    assert "| S-DEV | 60.0 ± 10.0 | 70.0 ± 10.0 | 65.0 ± 5.0 |" in markdown


def test_word_labels_land_on_each_words_tokens_in_both_views():
    """Token classification's spans: every word's tokens cover exactly that word in the LLM's and the MT encoder's
    tokenization (words of several tokens, split differently by the two); first-subword keeps the first; words
    cut by max_length have none and are predicted as the first label; padding words carry IGNORED."""
    from mtllm_train.portable.encoding import IGNORED, collate, encode_examples
    from mtllm_train.portable.heads import word_predictions

    words = ["Yesterday", "Maximiliane", "Oberholzer-Schmidt", "visited", "Kraków", "."]
    example = {"words": words, "label": [0, 1, 2, 0, 3, 0]}
    counts = {}
    for view in ("llm", "mt"):
        tokenizer = load_tokenizer(f"configs/tiny/{view}_tokenizer", view)
        set_source_language(tokenizer, "eng_Latn")
        offsets = tokenizer(" ".join(words), return_offsets_mapping=True)["offset_mapping"]
        (item,) = encode_examples([example], "token_classification", tokenizer, 64, "mean")
        text = " ".join(words)
        assert all(span == list(range(span[0], span[-1] + 1)) for span in item["spans"])  # a run of tokens
        assert [text[offsets[span[0]][0]:offsets[span[-1]][1]].strip() for span in item["spans"]] == words
        counts[view] = [len(span) for span in item["spans"]]
        (first,) = encode_examples([example], "token_classification", tokenizer, 64, "first")
        assert first["spans"] == [span[:1] for span in item["spans"]] and first["ids"] == item["ids"]
        (cut,) = encode_examples([example], "token_classification", tokenizer, 8, "mean")
        assert [len(span) for span in cut["spans"]][2:] == [0, 0, 0, 0] and cut["spans"][0] == item["spans"][0]
        short = {"words": ["Kraków"], "label": [3]}
        inputs, labels = collate([cut, *encode_examples([short], "token_classification", tokenizer, 8, "mean")],
                                 pad_id(tokenizer))
        assert labels.tolist() == [example["label"], [3] + [IGNORED] * 5]
        logits = torch.zeros(2, 6, 4)
        logits[:, :, 3] = 1.0  # every word scores label 3 best
        assert word_predictions(logits, inputs["span_masks"]).tolist() == [[3, 3, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]]
    assert all(n > 1 for n in counts["llm"][:3]) and all(n > 1 for n in counts["mt"][:3])
    assert counts["llm"][0] != counts["mt"][0]  # "Yesterday": 5 LLM tokens, 4 MT tokens


def test_entity_f1_counts_hand_labelled_entities_as_seqeval_does():
    from seqeval.metrics import f1_score

    from mtllm_train.tasks.evaluation import entity_counts, score

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"], ["B-LOC", "O", "O", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"],  # PER found; LOC missed, a wrong ORG predicted
                 ["O", "B-ORG", "O", "O"],  # ORG cut short: not found
                 ["B-LOC", "O", "I-PER", "O"]]  # LOC found; a stray I-PER is an entity of its own (conlleval)
    counts = entity_counts(gold, predicted)
    assert counts == [2, 5, 4]  # found, predicted, gold
    assert score(torch.tensor(counts), "entity_f1") == pytest.approx(2 * 2 / 9) == pytest.approx(f1_score(gold, predicted))


def test_token_task_and_stage1_lora_settings_are_checked():
    from mtllm_train.config import load_config
    from mtllm_train.tasks.finetune import check_task_config

    base = ["task.name=token_classification", "task.labels=[O, B-PER, I-PER]", "task.train=x.jsonl"]
    with pytest.raises(ConfigError, match=r"task.labels: entity_f1 reads BIO tags .*'NOUN' is not one"):
        load_config("configs/tiny.yaml", [*base[:1], "task.labels=[NOUN, VERB]", "task.metric=entity_f1"])
    with pytest.raises(ConfigError, match=r"task.metric: entity_f1 scores the labelled words of token_classification, "
                                          r"not sentiment"):
        load_config("configs/tiny.yaml", ["task.name=sentiment", "task.metric=entity_f1"])
    with pytest.raises(ConfigError, match=r"task.translate_test: token_classification labels the words of the original "
                                          r"text"):
        check_task_config(load_config("configs/tiny.yaml", [*base, "task.translate_test=true"]), "task-train")
    with pytest.raises(ConfigError, match=r"task.stage1_lora: merge merges the stage-1 stack's LoRA; task-train of "
                                          r"task.model llm has none"):
        check_task_config(load_config("configs/tiny.yaml", [*base, "task.stage1_lora=merge"]), "task-train")
    with pytest.raises(ConfigError, match=r"task.stage1_lora: merge cannot add the stage-1 LoRA to a nf4 base"):
        check_task_config(load_config("configs/tiny.yaml", [*base, "task.stage1_lora=merge", "task.model=stack",
                                                            "task.init_from=runs/x", "model.quantization=nf4"]),
                          "task-train")
