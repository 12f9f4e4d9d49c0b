import torch, xent.torch as xt
x = torch.randn(16, 50, requires_grad=True); y = torch.randint(0, 50, (16,))
def f(x):
    loss = xt.cross_entropy(x, y)
    return loss, loss.detach()
for bk in ("aot_eager", "inductor"):
    torch._dynamo.reset()
    try:
        l, d = torch.compile(f, fullgraph=True, backend=bk)(x.clone().detach().requires_grad_(True)); l.backward(); print(bk, "ok")
    except Exception as e:
        print(bk, type(e).__name__, str(e)[:100])
