import pytest
import torch

from mtllm_train.model.loss import fvu_from_sums, squared_error
from mtllm_train.portable.pooling import pool


def fvu(student, teacher):
    """FVU of one batch, from the sums the trainer all-reduces."""
    return fvu_from_sums(float(squared_error(student, teacher).sum()), teacher.sum(0), teacher.pow(2).sum(0),
                         teacher.shape[0])

# Two sequences of length 4, hidden size 2; token t of sequence b holds [10*b + t, -(10*b + t)].
HIDDEN = torch.tensor([[[t, -t] for t in range(4)], [[10 + t, -(10 + t)] for t in range(4)]], dtype=torch.float32)
RIGHT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LEFT = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.parametrize("mask, expected", [
    (RIGHT, {"mean": [[1.0, -1.0], [10.5, -10.5]], "eos": [[2.0, -2.0], [11.0, -11.0]],
             "bos": [[0.0, 0.0], [10.0, -10.0]]}),
    (LEFT, {"mean": [[2.0, -2.0], [12.5, -12.5]], "eos": [[3.0, -3.0], [13.0, -13.0]],
            "bos": [[1.0, -1.0], [12.0, -12.0]]}),
], ids=["right-padding", "left-padding"])
def test_pooling_matches_hand_computed_values(mask, expected):
    for strategy, values in expected.items():
        torch.testing.assert_close(pool(HIDDEN, mask, strategy), torch.tensor(values), msg=strategy)


def test_pooling_returns_fp32_from_bf16_states():
    pooled = pool(HIDDEN.bfloat16(), RIGHT, "mean")
    assert pooled.dtype == torch.float32


def test_unknown_pooling_is_an_error():
    with pytest.raises(ValueError, match="pooling 'max'"):
        pool(HIDDEN, RIGHT, "max")


def test_mse_and_fvu_values():
    teacher = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    student = torch.tensor([[1.0, 1.0], [1.0, 2.0]])
    torch.testing.assert_close(squared_error(student, teacher), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(squared_error(student, teacher).mean(), torch.tensor(1.25))
    # Per-dimension population variance of the teacher: [1, 1] -> mean 1; FVU = 1.25 / 1.
    assert fvu(student, teacher) == pytest.approx(1.25)
    # Predicting the teacher mean everywhere explains nothing: FVU == 1.
    mean_prediction = teacher.mean(0).expand_as(teacher)
    assert fvu(mean_prediction, teacher) == pytest.approx(1.0)


def test_fvu_from_sums_combines_shards_like_one_batch():
    teacher, student = torch.randn(10, 3), torch.randn(10, 3)
    halves = [(student[:4], teacher[:4]), (student[4:], teacher[4:])]
    error = sum(float(squared_error(s, t).sum()) for s, t in halves)
    total = fvu_from_sums(error, sum(t.sum(0) for _, t in halves), sum(t.pow(2).sum(0) for _, t in halves), 10)
    assert total == pytest.approx(fvu(student, teacher), rel=1e-5)
