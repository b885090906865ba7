import time, numpy as np, torch, cupy as cp
import gradmesh.core as gm, gradmesh.core.nn.functional as F
def bench(fn, n=20):
    fn(); cp.cuda.Device().synchronize(); torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(n): fn()
    cp.cuda.Device().synchronize(); torch.cuda.synchronize()
    return (time.perf_counter()-t)/n*1e3
for (N,C,H,O,k,s,p,g) in [(32,16,32,16,3,1,1,1),(64,64,32,64,3,1,1,1),(32,32,16,64,3,2,1,1)]:
    x=np.random.randn(N,C,H,H).astype(np.float32); w=np.random.randn(O,C//g,k,k).astype(np.float32)
    gx=gm.tensor(x,device='cuda',requires_grad=True); gw=gm.tensor(w,device='cuda',requires_grad=True)
    tx=torch.tensor(x,device='cuda',requires_grad=True); tw=torch.tensor(w,device='cuda',requires_grad=True)
    def gs():
        y=F.conv2d(gx,gw,stride=s,padding=p,groups=g); y.backward(gm.ones_like(y)); gx.grad=gw.grad=None
    def ts():
        y=torch.nn.functional.conv2d(tx,tw,stride=s,padding=p,groups=g); y.backward(torch.ones_like(y)); tx.grad=tw.grad=None
    print("conv", (N,C,H,O,k,s,p,g), "fwd+bwd gm %.2f torch %.2f ms"%(bench(gs),bench(ts)))
x=np.random.randn(64,64,32,32).astype(np.float32)
gx=gm.tensor(x,device='cuda',requires_grad=True); tx=torch.tensor(x,device='cuda',requires_grad=True)
def gp(): y=F.max_pool2d(gx,3,2,1); y.backward(gm.ones_like(y)); gx.grad=None
def tp(): y=torch.nn.functional.max_pool2d(tx,3,2,1); y.backward(torch.ones_like(y)); tx.grad=None
print("maxpool3s2 gm %.2f torch %.2f ms"%(bench(gp),bench(tp)))
X=np.random.randn(256,1024).astype(np.float32); Y=np.random.randint(0,10,256)
gX=gm.tensor(X,device='cuda',requires_grad=True); gY=gm.tensor(Y,device='cuda')
def gce(): l=F.cross_entropy(gX,gY,label_smoothing=0.1); l.backward(); gX.grad=None
tX=torch.tensor(X,device='cuda',requires_grad=True); tY=torch.tensor(Y,device='cuda')
def tce(): l=torch.nn.functional.cross_entropy(tX,tY,label_smoothing=0.1); l.backward(); tX.grad=None
print("ce gm %.2f torch %.2f ms"%(bench(gce),bench(tce)))
m=F.dropout(gm.ones(1000,device='cuda'),0.3,generator=gm.Generator().manual_seed(1)).cpu().numpy()
c=F.dropout(gm.ones(1000),0.3,generator=gm.Generator().manual_seed(1)).numpy()
print("dropout cpu==cuda", np.array_equal(m,c))
