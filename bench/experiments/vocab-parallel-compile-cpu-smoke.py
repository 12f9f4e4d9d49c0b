"""Session 48: `vocab_parallel_cross_entropy` under `torch.compile` on a CPU without a GPU: a
one-rank gloo group, and the three steps (`shard_stats`, `shard_loss`, `shard_grad`) replaced by
CPU stand-ins in plain torch (the custom operators' own code and fakes, Dynamo's tracing of the
functional all-gather and the compiled backward are the real ones). Prints the graph breaks (0)
and whether the compiled loss and the head's gradient match `F.cross_entropy`'s. Run with the
wheel's site folder on PYTHONPATH (its `_xent` is needed for the options and the CPU scaling).
The GPU test is `test_torch_compile_through_a_one_rank_nccl_group`. Session 53 added the entropies
(`return_entropy`, the stand-ins' entropies and their gradient in plain torch) and an
entropy-bonus case, against `F.cross_entropy - β·H` in autograd."""
import torch, torch.nn.functional as F, torch.distributed as dist
import xent.torch as xt
from xent.torch import vocab_parallel as vp, _ops
K = 3  # words a row in the stand-in
class FakeX:
    def __getattr__(self, n): return getattr(vp.__dict__['_xent_real'], n)
    @staticmethod
    def shard_words(dev, rows, vocab, world, dtype, opts, pred, entropy=False): return rows * K
vp.__dict__['_xent_real'] = vp._xent
vp._xent = FakeX()
vp._launch.device = lambda i: None
torch.cuda.current_device = lambda: 0
calls = []
def shard_stats(logits, target, *, vocab_start, vocab_size, world, weight=None, opts, predicted=False,
                entropy=False):
    calls.append("stats")
    return torch.zeros(target.numel() * K, dtype=torch.float32)
def rows_of(logits, target, opts):
    x = logits.detach().float(); V = x.shape[-1]; eps = opts.label_smoothing
    valid = target != opts.ignore_index
    t = target.clamp(min=0)
    lse = torch.logsumexp(x, -1)
    row = (1 - eps) * (lse - x.gather(1, t.view(-1, 1)).view(-1)) + eps * (lse - x.mean(-1))
    row = torch.where(valid, row, torch.zeros_like(row))
    onehot = F.one_hot(t, V).float()
    g = torch.softmax(x, -1) - ((1 - eps) * onehot + eps / V)
    g = torch.where(valid.view(-1, 1), g, torch.zeros_like(g))
    n = valid.sum().float()
    return row, g, n
def entropies(logits, target, opts):
    x = logits.detach().float()
    h = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    return torch.where(target != opts.ignore_index, h, torch.zeros_like(h))
def shard_loss(logits, target, gathered, *, vocab_start, vocab_size, world, weight=None, opts, fused, predicted=None,
               entropy=None):
    calls.append(("loss", fused, gathered.numel()))
    row, g, n = rows_of(logits, target, opts)
    if entropy is not None:
        entropy.copy_(entropies(logits, target, opts))
    stats = torch.zeros(_ops.stats_len(target.numel(), opts.return_token_accuracy))
    if opts.reduction == "none":
        stats[_ops.STATS_ROWS:_ops.STATS_ROWS + target.numel()] = row
    else:
        stats[_ops.STATS_LOSS] = row.sum() / (n if opts.reduction == "mean" else 1)
    if fused:
        logits.copy_((g * opts.grad_scale / (n if opts.reduction == "mean" else 1)).to(logits.dtype))
    return stats
def shard_grad(logits, target, stats, upstream, *, vocab_start, vocab_size, weight=None, opts, entropy=None,
               entropy_upstream=None):
    calls.append("grad" if entropy_upstream is None else "grad+entropy")
    row, g, n = rows_of(logits, target, opts)
    up = upstream.view(-1, 1) if upstream.numel() > 1 else upstream
    if opts.reduction == "mean":
        g = g / n
    g = g * up * opts.grad_scale
    if entropy_upstream is not None:  # d H / d x = p·(lse - x - H)
        x = logits.detach().float()
        p = torch.softmax(x, -1)
        d = torch.logsumexp(x, -1, keepdim=True) - x - entropy.view(-1, 1)
        g = g + entropy_upstream.view(-1, 1) * p * d
    logits.copy_(g.to(logits.dtype))
vp.shard_stats, vp.shard_loss, vp.shard_grad = shard_stats, shard_loss, shard_grad

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
torch.manual_seed(0)
V, N, D = 300, 24, 16
head = torch.nn.Linear(D, V, bias=False)
h = torch.randn(N, D); y = torch.randint(0, V, (N,)); y[::5] = -100
for two_phase, red in ((False, "mean"), (True, "mean"), (True, "none")):
    def step(h):
        return xt.vocab_parallel_cross_entropy(head(h), y, vocab_start=0, vocab_size=V, two_phase=two_phase, reduction=red, label_smoothing=0.1)
    torch._dynamo.reset(); calls.clear()
    expl = torch._dynamo.explain(step)(h)
    print("graph breaks", expl.graph_break_count, [str(r.reason)[:200] for r in expl.break_reasons])
    torch._dynamo.reset(); calls.clear()
    c = torch.compile(step, fullgraph=True, backend="aot_eager")
    head.zero_grad()
    loss = c(h); (loss.sum() * 0.5).backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    logits = head(h); l = F.cross_entropy(logits, y, reduction=red, label_smoothing=0.1); (l.sum() * 0.5).backward()
    print(two_phase, red, "loss ok", torch.allclose(loss, l.detach(), atol=1e-6), "grad ok", torch.allclose(got, head.weight.grad, atol=1e-6), calls)
# An entropy bonus (two-phase by default with return_entropy): loss - beta * mean(H) over the scored rows.
beta, scored = 0.1, y != -100
def step(h):
    out = xt.vocab_parallel_cross_entropy(head(h), y, vocab_start=0, vocab_size=V, label_smoothing=0.1,
                                          return_entropy=True)
    return out.loss - beta * (out.entropy * scored).sum() / scored.sum(), out.entropy.detach()
torch._dynamo.reset(); calls.clear()
expl = torch._dynamo.explain(step)(h)
print("graph breaks", expl.graph_break_count, [str(r.reason)[:200] for r in expl.break_reasons])
torch._dynamo.reset(); calls.clear()
c = torch.compile(step, fullgraph=True, backend="aot_eager")
head.zero_grad()
loss, ent = c(h); (loss * 0.5).backward()
got = head.weight.grad.clone()
head.zero_grad()
logits = head(h)
want_h = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
l = F.cross_entropy(logits, y, label_smoothing=0.1) - beta * want_h[scored].mean(); (l * 0.5).backward()
print("entropy bonus", "loss ok", torch.allclose(loss, l.detach(), atol=1e-6), "entropy ok",
      torch.allclose(ent[scored], want_h[scored].detach(), atol=1e-6), "grad ok",
      torch.allclose(got, head.weight.grad, atol=1e-6), calls)
dist.destroy_process_group()
