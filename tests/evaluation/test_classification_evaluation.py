"""The classification evaluator: top-k, the agreement with a reference model's logits, the predictions file."""
import json

import pytest
import torch


def test_classification_evaluator_against_reference_model(tmp_path):
    """kl_to_reference / top1_agreement against a direct computation over two batches; labels untouched."""
    from bgd_det.evaluation import ClassificationEvaluator

    torch.manual_seed(0)
    reference = torch.nn.Linear(6, 5)
    model = torch.nn.Linear(6, 5)
    batches = [(torch.randn(7, 6), torch.randint(0, 5, (7,))), (torch.randn(4, 6), torch.randint(0, 5, (4,)))]
    ev = ClassificationEvaluator(topk=(1,))
    with torch.no_grad():
        for x, y in batches:
            ev.process((x, y), model(x), reference(x))
        out = ev.evaluate()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        p, q = torch.softmax(reference(x).double(), 1), torch.softmax(model(x).double(), 1)
    kl = float((p * (p.log() - q.log())).sum(1).mean())
    assert out["kl_to_reference"] == pytest.approx(kl, rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(100.0 * float((p.argmax(1) == q.argmax(1)).double().mean()))
    assert out["top1"] == pytest.approx(100.0 * float((q.argmax(1) == y).double().mean()))
    assert out["n_images"] == 11
    # the model against itself: zero divergence, full agreement; predictions.json holds the top-1 of every image
    ev = ClassificationEvaluator(topk=(1,), output_dir=str(tmp_path))
    with torch.no_grad():
        ev.process(batches[0], model(batches[0][0]), model(batches[0][0]))
    assert ev.evaluate()["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved == {"top1": model(batches[0][0]).argmax(1).tolist(), "label": batches[0][1].tolist()}
    ev = ClassificationEvaluator(topk=(1,))  # reference logits for some batches only: one clear error
    with torch.no_grad():
        ev.process(batches[0], model(batches[0][0]), reference(batches[0][0]))
        ev.process(batches[1], model(batches[1][0]))
    with pytest.raises(ValueError, match="reference logits came with 7 of 11 images; allowed: all or none"):
        ev.evaluate()


def test_paired_evaluation_scores_the_reference_from_the_same_pass(tmp_path):
    """inference_on_dataset with a PairedEvaluator runs each model once per batch; the reference's own metrics and
    predictions equal those of evaluating it alone, the model's keep their agreement."""
    from bgd_det.evaluation import ClassificationEvaluator, PairedEvaluator, inference_on_dataset

    torch.manual_seed(0)
    reference, model = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    calls = []
    for net in (reference, model):
        net.register_forward_hook(lambda m, i, o: calls.append(m))
    batches = [(torch.randn(7, 6), torch.randint(0, 5, (7,))), (torch.randn(4, 6), torch.randint(0, 5, (4,)))]
    out = inference_on_dataset(model, batches, ClassificationEvaluator(), reference=reference,
                               reference_evaluator=ClassificationEvaluator(output_dir=str(tmp_path / "ref")))
    assert len(calls) == 4 and calls.count(reference) == 2  # one forward of each model per batch
    alone = inference_on_dataset(reference, batches, ClassificationEvaluator(output_dir=str(tmp_path / "alone")))
    with_agreement = inference_on_dataset(model, batches, ClassificationEvaluator(), reference=reference)
    assert out.pop("reference") == alone and out == with_agreement
    assert (tmp_path / "ref" / "predictions.json").read_text() == (tmp_path / "alone" / "predictions.json").read_text()
    with pytest.raises(ValueError, match="reference_evaluator given without reference="):
        inference_on_dataset(model, batches, ClassificationEvaluator(), reference_evaluator=ClassificationEvaluator())
    paired = PairedEvaluator(ClassificationEvaluator(), ClassificationEvaluator())
    with pytest.raises(ValueError, match="PairedEvaluator needs the reference's outputs"):
        inference_on_dataset(model, batches, paired)
