"""Train a timm student from a cached teacher in a plain PyTorch loop, with its loss from the registry.

    python -m pipeline run extract          # the teacher, once (the embedded default)
    python examples/train_plain.py --student deit-spectral --epochs 2

The student's model, layer pairs, loss (any registered method) and optimizer settings are read from
its entry in pipeline.yaml; everything else is an ordinary training loop you can change.
"""

from __future__ import annotations

import argparse
import json

import timm
import timm.optim
import torch

import spectralkd


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="pipeline.yaml")
    p.add_argument("--workdir", default=None)
    p.add_argument("--student", default="deit-spectral", help="a student of distill.students")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--in-order", action="store_true", help="rows in cache order (no shuffle)")
    p.add_argument("--log-steps", action="store_true", help="print each step's loss and rows as JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    cfg = spectralkd.load(args.config, args.workdir)
    st = cfg.student(args.student)  # the student's entry with distill.defaults filled in
    pairs = spectralkd.layer_pairs(cfg, args.student)
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    cache = spectralkd.open_cache(cfg)

    torch.manual_seed(st.seed)
    model = timm.create_model(st.model, num_classes=cfg.data.num_classes, **st.kwargs)
    loss_fn = spectralkd.student_loss(cfg, args.student, model, cache)  # extras sized from the pairs' shapes
    reads = loss_fn.reads  # what the loss reads of the teacher: logits, layers as spectra or features, pooled
    widths = {p.teacher: p.student_shape[0] for p in loss_fn.pairs} if reads.pooled else None
    data = spectralkd.CacheDataset(cache, cfg.data, logits=reads.logits, layers=t_layers if reads.reads_layers else (),
                                   form=reads.form or "spectra", widths=widths, views=st.views)
    trained = spectralkd.Trainable(model, loss_fn)  # the loss's extras train with the student, as the pipeline's
    opt = timm.optim.create_optimizer_v2(trained, opt=st.optimizer, lr=st.lr, weight_decay=st.weight_decay)

    step = 0
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        order = range(len(data)) if args.in_order else data.unit_order(seed=st.seed)  # unit-grouped reads
        loader = torch.utils.data.DataLoader(data, batch_size=st.batch_size, sampler=list(order))
        model.train()
        for batch in loader:
            logits, feats = features(model, batch["x"], s_layers if reads.reads_layers else [])
            targets = batch["targets"]
            heads = logits if isinstance(logits, tuple) else (logits, None)  # a distillation token's second head
            student = spectralkd.StudentOutputs(heads[0], feats, heads[1])
            teacher = spectralkd.TeacherTargets(targets.get("logits"), [targets[t] for t in t_layers if t in targets])
            terms = loss_fn(student, teacher, batch["y"], epoch)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            if args.log_steps:
                print(json.dumps({"step": step, "loss": terms["total"].item(), "rows": batch["row"].tolist()}))
            step += 1
            if args.steps is not None and step >= args.steps:
                return
        print(f"epoch {epoch + 1}: " + " ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))


def features(model, x, layers):
    """(logits, NCHW features of ``layers``, in that order) in one forward pass: timm's
    forward_intermediates, which hands the layers back in block order whatever order they are asked in."""
    if not layers:
        return model(x), []
    order = sorted(set(layers))
    final, feats = model.forward_intermediates(x, indices=order, output_fmt="NCHW")
    taken = dict(zip(order, feats))
    return model.forward_head(final), [taken[i] for i in layers]


if __name__ == "__main__":
    main()
