import pytest
import torch

from mtllm_train.config import ConfigError
from mtllm_train.model.loading import load_tokenizer
from mtllm_train.tasks.heads import ClassificationHead, MultipleChoiceHead
from mtllm_train.tasks.languages import BENCHMARKS, resolve, tokenizer_language_codes


@pytest.fixture(scope="module")
def mt_codes():
    return tokenizer_language_codes(load_tokenizer("configs/tiny/mt_tokenizer", "model.mt_tokenizer"))


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
    with pytest.raises(ConfigError, match=r"benchmark 'glue'"):
        resolve("en", "glue", mt_codes)


def test_languages_without_an_nllb_code_need_an_explicit_fallback(mt_codes):
    with pytest.raises(ConfigError, match=r"language 'nij' of nusax has no NLLB-200 code; give an explicit fallback"):
        resolve("nij", "nusax", mt_codes)
    assert resolve("nij", "nusax", mt_codes, {"nij": "ind_Latn"}) == "ind_Latn"
    with pytest.raises(ConfigError, match=r"'ind_Grek' \(the fallback for 'nij'\) is not a language code"):
        resolve("nij", "nusax", mt_codes, {"nij": "ind_Grek"})


def test_multiple_choice_pools_each_choice_over_its_own_span():
    head = MultipleChoiceHead(2)
    head.linear.weight.data = torch.tensor([[1.0, 0.0]])
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [10.0, 0.0], [20.0, 0.0], [99.0, 0.0]]])
    choice_masks = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]])
    torch.testing.assert_close(head(hidden, choice_masks), torch.tensor([[2.0, 15.0, 99.0]]))


def test_classification_head_has_no_bias():
    head = ClassificationHead(4, 3)
    assert head.linear.bias is None and head(torch.ones(2, 4)).shape == (2, 3)
