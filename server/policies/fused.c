/* Gap-Aware update fused into one pass over the parameters (loaded by fused.py).

   Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness", ICLR 2020
   (https://arxiv.org/abs/1909.10802); the arithmetic is ALGORITHMS.md, "GA" and "DANA-GA",
   followed by "The common SGD step" or DANA-Zero's step. Per element i:

       s   = buf if μ > 0 else g                     v ← β·v + (1−β)·s²
       Gap = 1 + (√(1−βᵏ)/η_max)·|θ − θ⁽ⁱ⁾| / (√v + ε·√(1−βᵏ))     (1 when η_max = 0)
       d   = (g + λ·θ) / Gap                         then the step with d

   Every operation is rounded as the torch reference (gap_aware.py, sgd.py, dana.py) rounds it,
   in the same order: one float32 rounding per torch operation, and a fused multiply-add (fmaf)
   where PyTorch's CPU kernels compute one: `add`/`sub` with an `alpha`, and `addcmul`. Build
   with -ffp-contract=off so that the compiler fuses nothing else. The one difference is the
   square root: sqrtf is correctly rounded, torch.sqrt (MKL's vector math) is within 1 ulp; see
   fused.py. The Gaps are summed in double, in the vector lanes (omp simd reduction).
   No torch headers: this file compiles in about a second with any C99 compiler. */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum step { STEP_PLAIN = 0, STEP_MOMENTUM = 1, STEP_NESTEROV = 2, STEP_DANA = 3 };

/* Mirrored field for field by fused.py's _Arguments. */
struct arguments {
    int64_t numel;
    float *theta;
    float *grad;               /* read; with old_theta_into_grad, θ's old values written after */
    const void *stale_theta;   /* float32, or bfloat16 when stale_bfloat16 */
    float *v;
    float *buffer;             /* GA: the master's buf; DANA: the worker's vⁱ; NULL for STEP_PLAIN */
    float *buffer_sum;         /* DANA: Σⱼ vʲ; otherwise NULL */
    int32_t step;              /* enum step */
    int32_t stale_bfloat16;
    int32_t weight_decayed;    /* λ ≠ 0 */
    int32_t gap_is_one;        /* η_max = 0: the guard of ALGORITHMS.md */
    int32_t old_theta_into_grad; /* leave θ as it was before the update in grad */
    float beta;                /* β */
    float one_minus_beta;      /* 1 − β, rounded from double as torch rounds the scalar */
    float eps_root_bias;       /* ε·√(1−βᵏ) */
    float gap_scale;           /* √(1−βᵏ)/η_max */
    float weight_decay;        /* λ */
    float momentum;            /* μ */
    float neg_lr;              /* −η */
    float neg_lr_momentum;     /* −η·μ (Nesterov) */
};

#define INLINE static inline __attribute__((always_inline))

INLINE float bfloat16_to_float(uint16_t bits)
{
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* One element: updates v, the buffers and θ in place and returns its Gap; with old_theta_into_grad
   the element's θ from before the update replaces its gradient, once read. The constant flags
   select the variant; each comment names the torch operation the line reproduces. */
INLINE float element(const struct arguments *a, int64_t i, float *restrict theta, float *restrict grad,
                     const void *restrict stale_theta, float *restrict v, float *restrict buffer,
                     float *restrict buffer_sum, const int step, const int stale_bfloat16,
                     const int weight_decayed, const int gap_is_one, const int old_theta_into_grad)
{
    const float g = grad[i], th = theta[i];
    const float b = step == STEP_PLAIN ? 0.0f : buffer[i];
    const float s = step == STEP_PLAIN ? g : b;
    const float scaled = v[i] * a->beta;                          /* v.mul_(β) */
    const float second = fmaf(a->one_minus_beta * s, s, scaled); /* .addcmul_(s, s, value=1−β) */
    v[i] = second;
    float gap = 1.0f;                                             /* out.fill_(1.0) */
    if (!gap_is_one) {
        const float stale = stale_bfloat16 ? bfloat16_to_float(((const uint16_t *)stale_theta)[i])
                                           : ((const float *)stale_theta)[i];
        const float c = sqrtf(second) + a->eps_root_bias;         /* sqrt(v).add_(ε·√(1−βᵏ)) */
        const float gap_abs = fabsf(th - stale);                  /* sub(θ, θ⁽ⁱ⁾).abs_() */
        gap = 1.0f + a->gap_scale * gap_abs / c;                  /* addcdiv(1, |Δ|, c, value=scale) */
    }
    const float decayed = weight_decayed ? fmaf(th, a->weight_decay, g) : g;  /* add(g, θ, alpha=λ) */
    const float d = decayed / gap;                                /* div(·, Gap) */
    float updated = th;
    switch (step) {
    case STEP_PLAIN:                                              /* θ.add_(d, alpha=−η) */
        updated = fmaf(d, a->neg_lr, th);
        break;
    case STEP_MOMENTUM: {                                         /* add(d, buf, alpha=μ, out=buf) */
        const float next = fmaf(b, a->momentum, d);
        buffer[i] = next;
        updated = fmaf(next, a->neg_lr, th);                      /* θ.add_(buf, alpha=−η) */
        break;
    }
    case STEP_NESTEROV: {
        const float next = fmaf(b, a->momentum, d);
        buffer[i] = next;
        updated = fmaf(next, a->neg_lr_momentum, fmaf(d, a->neg_lr, th));  /* θ.add_(d, −η).add_(buf, −η·μ) */
        break;
    }
    case STEP_DANA: {
        const float others = buffer_sum[i] - b;                   /* Σv.sub_(vⁱ) */
        const float next = fmaf(b, a->momentum, d);               /* add(d, vⁱ, alpha=μ, out=vⁱ) */
        buffer[i] = next;
        buffer_sum[i] = others + next;                            /* Σv.add_(vⁱ) */
        updated = fmaf(next, a->neg_lr, th);                      /* θ.add_(vⁱ, alpha=−η) */
        break;
    }
    }
    theta[i] = updated;
    if (old_theta_into_grad)
        grad[i] = th;
    return gap;
}

/* The whole vector for one variant, vectorised by the compiler; returns the sum of the Gaps. */
INLINE double walk(const struct arguments *arguments, const int step, const int stale_bfloat16,
                   const int weight_decayed, const int gap_is_one, const int old_theta_into_grad)
{
    const struct arguments local = *arguments;  /* a copy no store through the pointers below can change */
    const struct arguments *a = &local;
    float *restrict theta = a->theta;
    float *restrict grad = a->grad;
    const void *restrict stale_theta = a->stale_theta;
    float *restrict v = a->v;
    float *restrict buffer = a->buffer;
    float *restrict buffer_sum = a->buffer_sum;
    const int64_t n = a->numel;
    double sum = 0.0;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < n; i++)
        sum += element(a, i, theta, grad, stale_theta, v, buffer, buffer_sum, step, stale_bfloat16,
                       weight_decayed, gap_is_one, old_theta_into_grad);
    return sum;
}

/* Turn the run-time flags into constants one at a time, so that each variant is compiled
   without branches in its loop. */
INLINE double by_old_theta(const struct arguments *a, const int step, const int stale_bfloat16,
                           const int weight_decayed, const int gap_is_one)
{
    return a->old_theta_into_grad ? walk(a, step, stale_bfloat16, weight_decayed, gap_is_one, 1)
                                  : walk(a, step, stale_bfloat16, weight_decayed, gap_is_one, 0);
}

INLINE double by_gap(const struct arguments *a, const int step, const int stale_bfloat16, const int weight_decayed)
{
    return a->gap_is_one ? by_old_theta(a, step, stale_bfloat16, weight_decayed, 1)
                         : by_old_theta(a, step, stale_bfloat16, weight_decayed, 0);
}

INLINE double by_decay(const struct arguments *a, const int step, const int stale_bfloat16)
{
    return a->weight_decayed ? by_gap(a, step, stale_bfloat16, 1) : by_gap(a, step, stale_bfloat16, 0);
}

INLINE double by_stale(const struct arguments *a, const int step)
{
    return a->stale_bfloat16 ? by_decay(a, step, 1) : by_decay(a, step, 0);
}

/* The entry point: apply one Gap-Aware push as described above; returns the sum of the Gaps. */
double gapaware_update(const struct arguments *a)
{
    switch (a->step) {
    case STEP_MOMENTUM: return by_stale(a, STEP_MOMENTUM);
    case STEP_NESTEROV: return by_stale(a, STEP_NESTEROV);
    case STEP_DANA: return by_stale(a, STEP_DANA);
    default: return by_stale(a, STEP_PLAIN);
    }
}
