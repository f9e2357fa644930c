"""Train a timm student from a cached teacher in a plain PyTorch loop, with the SpectralKD loss.

    python -m pipeline run extract          # the teacher, once (the embedded default)
    python examples/train_plain.py --student deit-spectral --epochs 2

The student's model, layer pairs, loss weights and optimizer settings are read from its entry in
pipeline.yaml; everything else is an ordinary training loop you can change.
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
    with torch.no_grad():  # teacher targets pooled to the student's widths
        probe = features(model, torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size), s_layers)[1]
    data = spectralkd.CacheDataset(cache, cfg.data, layers=t_layers, widths={t: f.shape[1] for t, f in
                                                                            zip(t_layers, probe)}, views=st.views)
    loss_fn = spectralkd.SpectralKDLoss.of(st.loss)
    opt = timm.optim.create_optimizer_v2(model, opt=st.optimizer, lr=st.lr, weight_decay=st.weight_decay)

    step = 0
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        order = range(len(data)) if args.in_order else data.unit_order(seed=st.seed)  # unit-grouped reads
        loader = torch.utils.data.DataLoader(data, batch_size=st.batch_size, sampler=list(order))
        model.train()
        for batch in loader:
            logits, feats = features(model, batch["x"], s_layers)
            targets = batch["targets"]
            terms = loss_fn(logits, batch["y"], targets.get("logits"), feats, [targets[t] for t in t_layers])
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            if args.log_steps:
                print(json.dumps({"step": step, "loss": terms.total.item(), "rows": batch["row"].tolist()}))
            step += 1
            if args.steps is not None and step >= args.steps:
                return
        print(f"epoch {epoch + 1}: loss {terms.total.item():.4f} (ce {terms.ce.item():.3f} kd {terms.kd.item():.3f} "
              f"spec {terms.spec.item():.4f})")


def features(model, x, layers):
    """(logits, NCHW features of ``layers``) in one forward pass: timm's forward_intermediates."""
    if not layers:
        return model(x), []
    final, feats = model.forward_intermediates(x, indices=layers, output_fmt="NCHW")
    return model.forward_head(final), feats


if __name__ == "__main__":
    main()
