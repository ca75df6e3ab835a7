import math

import numpy as np
import pytest
import torch
from torch import nn

from mmpt.errors import MmptError
from mmpt.evaluation.metrics import compute_metrics, predicted_grades
from mmpt.model.losses import CoralLoss, CornLoss, build_loss
from mmpt.model.net import CoralHead, build_head
from mmpt.tasks import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL, TASKS
from tests.helpers import tiny_config
from tests.tolerances import above, below

# the first dataset of each task type: pathmnist, pneumoniamnist, chestmnist, retinamnist
SPEC = {
    kind: next(t for t in TASKS.values() if t.task_type == kind) for kind in (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
}
# (task type, ordinal loss) pairs covering every loss
CASES = [
    (MULTI_CLASS, "coral"),
    (BINARY, "coral"),
    (MULTI_LABEL, "coral"),
    (ORDINAL, "ce"),
    (ORDINAL, "coral"),
    (ORDINAL, "corn"),
]


def _labels(task, n, generator):
    if task.task_type == MULTI_LABEL:
        return torch.randint(0, 2, (n, task.num_classes), generator=generator)
    return torch.randint(0, task.num_classes, (n, 1), generator=generator)


def _confident_logits(loss, task, labels, margin=8.0):
    """Logits that put the given labels far on the right side of every decision."""
    if task.task_type == MULTI_LABEL:
        return margin * (2 * labels.float() - 1)
    if loss.num_outputs == task.num_classes - 1:  # CORAL and CORN: logit k says y > k
        levels = labels > torch.arange(loss.num_outputs)  # N×(K−1): y > k
        return margin * (2 * levels.float() - 1)
    return margin * nn.functional.one_hot(labels[:, 0], task.num_classes).float()


@pytest.mark.parametrize("task_type,ordinal", CASES)
def test_loss_is_smaller_for_correct_than_for_wrong_confident_logits(task_type, ordinal):
    task = SPEC[task_type]
    loss = build_loss(task, ordinal=ordinal)
    labels = _labels(task, 32, torch.Generator().manual_seed(0))
    if task_type == MULTI_LABEL:
        wrong = 1 - labels
    else:
        wrong = (labels + 1) % task.num_classes
    correct_loss = loss(_confident_logits(loss, task, labels), labels)
    wrong_loss = loss(_confident_logits(loss, task, wrong), labels)
    assert correct_loss.ndim == 0
    assert correct_loss < 0.01 < 1.0 < wrong_loss


@pytest.mark.parametrize("task_type,ordinal", CASES)
def test_zero_logits_give_the_uninformed_loss(task_type, ordinal):
    task = SPEC[task_type]
    loss = build_loss(task, ordinal=ordinal)
    labels = _labels(task, 16, torch.Generator().manual_seed(1))
    value = loss(torch.zeros(16, loss.num_outputs), labels)
    # CE: log K over K uniform classes; BCE, CORAL and CORN: log 2 per (mean over) label or threshold
    binary_terms = (ordinal in ("coral", "corn") and task_type == ORDINAL) or task_type == MULTI_LABEL
    expected = math.log(2) if binary_terms else math.log(task.num_classes)
    assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "task_type,ordinal,outputs,head",
    [
        (MULTI_CLASS, "coral", 9, "linear"),
        (BINARY, "coral", 2, "linear"),
        (MULTI_LABEL, "coral", 14, "linear"),
        (ORDINAL, "ce", 5, "linear"),
        (ORDINAL, "coral", 4, "coral"),
        (ORDINAL, "corn", 4, "linear"),
    ],
)
def test_each_task_type_gets_its_head_size(task_type, ordinal, outputs, head):
    task = SPEC[task_type]
    loss = build_loss(task, ordinal=ordinal)
    assert (loss.num_outputs, loss.head) == (outputs, head)
    module = build_head(loss.head, 16, loss.num_outputs, task.num_classes)
    assert module(torch.randn(3, 16)).shape == (3, outputs)


@pytest.mark.parametrize("task_type,ordinal", CASES)
def test_scores_have_one_column_per_class(task_type, ordinal):
    task = SPEC[task_type]
    loss = build_loss(task, ordinal=ordinal)
    scores = loss.scores(torch.randn(7, loss.num_outputs, generator=torch.Generator().manual_seed(2)))
    assert scores.shape == (7, task.num_classes)
    assert ((scores >= 0) & (scores <= 1)).all()
    if task_type != MULTI_LABEL:
        assert torch.allclose(scores.sum(dim=1), torch.ones(7))


def test_coral_scores_are_differences_of_cumulative_probabilities():
    loss = CoralLoss(num_classes=4)
    logits = torch.tensor([[2.0, 0.0, -1.0]])  # rank-consistent: P(y>k) decreasing
    above = torch.sigmoid(logits)[0]
    expected = torch.stack([1 - above[0], above[0] - above[1], above[1] - above[2], above[2]])
    assert torch.allclose(loss.scores(logits)[0], expected)


def test_coral_scores_stay_probabilities_when_logits_are_not_ordered():
    loss = CoralLoss(num_classes=4)
    scores = loss.scores(torch.tensor([[-1.0, 3.0, 0.0]]))  # P(y>1) > P(y>0): a negative difference
    assert (scores >= 0).all()
    assert scores.sum().item() == pytest.approx(1.0)
    assert scores[0, 1].item() == 0.0


def test_coral_loss_targets_are_cumulative_levels():
    loss = CoralLoss(num_classes=5)
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[0], [2], [4]])
    levels = torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    expected = nn.functional.binary_cross_entropy_with_logits(logits, levels)
    assert torch.allclose(loss(logits, labels), expected)


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    loss = build_loss(TASKS["bloodmnist"])
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    labels = torch.tensor([[0], [7], [3], [3], [1], [5]])
    loss(logits, labels).backward()
    expected = (logits.softmax(dim=1) - nn.functional.one_hot(labels[:, 0], 8)) / 6
    assert torch.allclose(logits.grad, expected.detach(), atol=1e-6)


def test_multi_label_loss_takes_int64_labels_of_width_14():
    loss = build_loss(TASKS["chestmnist"])
    logits = torch.randn(4, 14, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 2, (4, 14), generator=torch.Generator().manual_seed(6))
    assert labels.dtype == torch.int64
    expected = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    assert torch.allclose(loss(logits, labels), expected)


def test_coral_head_starts_rank_consistent():
    head = CoralHead(in_features=8, num_classes=5)
    logits = head(torch.randn(10, 8, generator=torch.Generator().manual_seed(7)))
    assert logits.shape == (10, 4)
    # one shared weight vector, so descending biases keep P(y>k) non-increasing in k for every input
    assert (logits[:, 1:] < logits[:, :-1]).all()


def test_coral_head_learns_a_one_dimensional_ordinal_problem():
    torch.manual_seed(0)
    num_classes = 5
    x = torch.rand(512, 1) * 2 - 1  # N×1 in [-1, 1)
    labels = ((x + 1) / 2 * num_classes).long().clamp(max=num_classes - 1)  # N×1 grades, equal-width bins
    x = x + 0.05 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 4), CoralHead(4, num_classes))
    loss = CoralLoss(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss(model(x), labels).backward()
        optimizer.step()
    accuracy = (loss.scores(model(x)).argmax(dim=1) == labels[:, 0]).float().mean().item()
    assert above(accuracy, 0.8)  # chance is 1/5


def test_unknown_ordinal_loss_lists_the_valid_ones():
    with pytest.raises(MmptError, match=r"coral.*corn"):
        build_loss(TASKS["retinamnist"], ordinal="cumulative")


def test_unknown_head_kind_is_an_mmpt_error():
    with pytest.raises(MmptError, match="linear"):
        build_head("mlp", 8, 2, 2)


def test_cross_entropy_equals_minus_log_softmax_by_hand():
    loss = build_loss(TASKS["retinamnist"], ordinal="ce")
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([[0], [4]])
    first = -math.log(math.e / (math.e + 4))
    second = -math.log(math.e / (math.e**2 + math.e + 3))
    assert loss(logits, labels).item() == pytest.approx((first + second) / 2)


def test_corn_loss_equals_the_conditional_subsets_by_hand():
    """Shi et al.: logit k is trained on the samples with y > k-1 only, against [y > k]."""
    loss = CornLoss(num_classes=3)
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-0.4, 1.5]])
    labels = torch.tensor([[0], [1], [2]])

    def bce(z, target):
        p = 1 / (1 + math.exp(-z))
        return -math.log(p) if target else -math.log(1 - p)

    # k=0: all three samples, targets y>0 = 0,1,1; k=1: samples with y>0 (the 2nd and 3rd), targets y>1 = 0,1
    terms = [bce(0.5, 0), bce(2.0, 1), bce(-0.4, 1), bce(0.3, 0), bce(1.5, 1)]
    assert loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_corn_scores_chain_the_conditional_probabilities():
    loss = CornLoss(num_classes=4)
    logits = torch.tensor([[1.0, -0.5, 2.0]])
    conditional = torch.sigmoid(logits)[0]
    above = torch.cumprod(conditional, dim=0)  # P(y > k)
    expected = torch.stack([1 - above[0], above[0] - above[1], above[1] - above[2], above[2]])
    assert torch.allclose(loss.scores(logits)[0], expected)


@pytest.mark.parametrize("ordinal", ["coral", "corn"])
def test_ordinal_grades_are_rank_consistent(ordinal):
    """The predicted grade g has P(y > k) > 0.5 exactly for k < g: it is the median of the class probabilities."""
    task = TASKS["retinamnist"]
    loss = build_loss(task, ordinal=ordinal)
    head = build_head(loss.head, 8, loss.num_outputs, task.num_classes)
    torch.manual_seed(8)
    for weight in head.parameters():  # spread the grades over all classes (CORAL keeps its ordered biases)
        if weight.ndim == 2:
            nn.init.normal_(weight, std=2.0)
    logits = head(torch.randn(500, 8))
    above = 1 - loss.scores(logits).cumsum(dim=1)[:, :-1]  # N×(K−1): P(y > k) recovered from the K probabilities
    # rank consistency: the cumulative probabilities never increase with k
    assert (above[:, 1:] <= above[:, :-1] + 1e-6).all()
    median = (above > 0.5).sum(dim=1)
    # the metrics read the median grade back from the saved probabilities
    grades = predicted_grades(loss.scores(logits).detach().numpy(), loss.grade_rule)
    assert np.array_equal(grades, median.numpy())
    assert len(np.unique(grades)) >= 3


def test_ordinal_mae_and_qwk_use_the_losses_grade_rule():
    task = TASKS["retinamnist"]
    loss = CornLoss(task.num_classes)
    # P(y > k) = 0.6, 0.36, ...: the median grade is 1, while the most probable class is 0 (p = 0.4)
    logits = torch.full((1, 4), math.log(0.6 / 0.4))
    assert loss.scores(logits).argmax().item() == 0
    assert predicted_grades(loss.scores(logits).numpy(), loss.grade_rule)[0] == 1
    labels = np.array([[1]])
    scores = loss.scores(logits).numpy()
    assert compute_metrics(task, labels, scores, grade_rule=loss.grade_rule)["mae"] == 0.0
    assert compute_metrics(task, labels, scores)["mae"] == 1.0  # the default rule: the argmax


def test_corn_learns_a_one_dimensional_ordinal_problem():
    torch.manual_seed(0)
    num_classes = 5
    x = torch.rand(512, 1) * 2 - 1  # N×1 in [-1, 1)
    labels = ((x + 1) / 2 * num_classes).long().clamp(max=num_classes - 1)  # N×1 grades, equal-width bins
    x = x + 0.05 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, num_classes - 1))
    loss = CornLoss(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss(model(x), labels).backward()
        optimizer.step()
    grades = predicted_grades(loss.scores(model(x)).detach().numpy(), loss.grade_rule)
    mae = np.abs(grades - labels[:, 0].numpy()).mean()
    assert below(mae, 0.3)  # predicting the middle grade for all gives 1.2


@pytest.mark.parametrize("ordinal", ["ce", "coral", "corn"])
def test_the_validation_loss_of_a_checkpoint_does_not_depend_on_the_eval_batch_size(synthetic_root, ordinal, tmp_path):
    """evaluate_all's loss is the mean over the split's loss terms (CORN: over its (image, threshold) pairs), at eval
    batch size 7 as at 64 and as over the whole split at once; train.monitor val_loss picks best.pt by it."""
    from mmpt.data.store import open_data
    from mmpt.evaluation.predict import evaluate_all, split_loader
    from mmpt.model.build import build_model, build_transform
    from mmpt.tasks import resolve_tasks

    cfg = tiny_config(
        synthetic_root, tmp_path, data={"datasets": ["breast", "chest", "retina", "blood"]}, loss={"ordinal": ordinal}
    )
    tasks = resolve_tasks(cfg.data.datasets)
    torch.manual_seed(3)
    model, losses = build_model(cfg, tasks)
    data = open_data(cfg.data, tasks)
    transform = build_transform(cfg, model)
    specs = {flag: d.task for flag, d in data.items()}
    loss = {}
    for batch_size in (7, 64, 1000):
        loader = split_loader(data, "val", torch.device("cpu"), batch_size=batch_size)
        results = evaluate_all(model, loader, specs, losses, transform, torch.device("cpu"))
        loss[batch_size] = {flag: r.metrics["loss"] for flag, r in results.items()}
    for flag in specs:  # 1000: the whole split (32 images) in one batch, the loss's own mean
        assert loss[7][flag] == pytest.approx(loss[1000][flag], rel=1e-6, abs=0), flag
        assert loss[64][flag] == pytest.approx(loss[1000][flag], rel=1e-6, abs=0), flag
    split = data["retinamnist"].splits["val"]
    x = transform(torch.from_numpy(np.array(split.open_images())))
    with torch.no_grad():
        whole = losses["retinamnist"](model(x, "retinamnist"), torch.from_numpy(split.labels)).item()
    assert loss[7]["retinamnist"] == pytest.approx(whole, rel=1e-6)
