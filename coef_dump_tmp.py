import sys, torch
sys.path.insert(0, "tests")
import hidream_serve.engine.schedulers.unipc as u
rec = []
orig = u._corrector_weights
def spy(rk, neg_h, b_h, device):
    r = orig(rk, neg_h, b_h, device)
    rec.append((rk.item().hex(), neg_h.item().hex(), b_h.item().hex(), [x.hex() for x in r.tolist()]))
    return r
u._corrector_weights = spy
import test_schedulers as t
z0, x0s = t.golden_inputs()
t.run(t.CASES["unipc_50_s3"], z0, x0s)
for i, r in enumerate(rec[:6]): print(i, *r)
s = t.build(t.CASES["unipc_50_s3"])
print([u._log_snr(s.sigmas[i]).item().hex() for i in range(5)])
print([torch.expm1(-u._log_snr(s.sigmas[i])).item().hex() for i in range(5)])
