"""The plain loop under DistributedDataParallel: each rank trains on its share of the cached rows.

    python -m pipeline run extract                                  # the teacher, once
    torchrun --nproc_per_node 2 examples/train_ddp.py --epochs 2    # gloo on CPU, nccl on GPUs

``DistributedSampler`` splits each epoch's rows between the ranks; ``set_epoch`` moves the sampler
and the dataset (view e mod K') to the next epoch together.
"""

from __future__ import annotations

import json
import os
import sys

import timm
import timm.optim
import torch
import torch.distributed as dist

import spectralkd
from train_plain import features, parse


class WithFeatures(torch.nn.Module):
    """forward(x) -> (logits, features of ``layers``): the module DDP wraps, so that its forward pass
    (which DDP's gradient synchronization hooks into) is the one that gives the features."""

    def __init__(self, model: torch.nn.Module, layers: list[int]):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, x):
        return features(self.model, x, self.layers)


def main(argv=None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    cfg = spectralkd.load(args.config, args.workdir)
    st = cfg.student(args.student)
    pairs = spectralkd.layer_pairs(cfg, args.student)
    s_layers, t_layers = [s for s, _ in pairs], [t for _, t in pairs]
    cache = spectralkd.open_cache(cfg)

    torch.manual_seed(st.seed)  # every rank starts from the same weights
    model = timm.create_model(st.model, num_classes=cfg.data.num_classes, **st.kwargs).to(device)
    loss_fn = spectralkd.student_loss(cfg, args.student, model, cache).to(device)
    reads = loss_fn.reads  # what the loss reads of the teacher
    layers = s_layers if reads.reads_layers else []
    widths = {p.teacher: p.student_shape[0] for p in loss_fn.pairs} if reads.pooled else None
    data = spectralkd.CacheDataset(cache, cfg.data, logits=reads.logits, layers=t_layers if layers else (),
                                   form=reads.form or "spectra", widths=widths, views=st.views)
    ids = [device.index] if cuda else None
    net = torch.nn.parallel.DistributedDataParallel(WithFeatures(model, layers), device_ids=ids)
    trained = spectralkd.Trainable(model, loss_fn)  # the loss's extras train with the student, as the pipeline's
    if any(True for _ in loss_fn.parameters()):
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=ids)  # its gradients averaged too
    opt = timm.optim.create_optimizer_v2(trained, opt=st.optimizer, lr=st.lr, weight_decay=st.weight_decay)
    sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=not args.in_order, seed=st.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=st.batch_size, sampler=sampler)

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        net.train()
        for batch in loader:
            batch_targets = {k: v.to(device) for k, v in batch["targets"].items()}
            logits, feats = net(batch["x"].to(device))
            heads = logits if isinstance(logits, tuple) else (logits, None)  # a distillation token's second head
            terms = loss_fn(spectralkd.StudentOutputs(heads[0], feats, heads[1]),
                            spectralkd.TeacherTargets(batch_targets.get("logits"),
                                                      [batch_targets[t] for t in t_layers if t in batch_targets]),
                            batch["y"].to(device), epoch)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            if args.log_steps:
                line = json.dumps({"rank": rank, "step": step, "loss": terms["total"].item(),
                                   "rows": batch["row"].tolist()})
                sys.stdout.write(line + "\n")  # one write per line: the ranks share the terminal
                sys.stdout.flush()
            step += 1
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {terms['total'].item():.4f} on rank 0", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
