// Defaults for the API's JSON messages: a missing or null field becomes its proto default here, once, so
// views never test for undefined and a newer or older back end cannot break them.

const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});
export const list = (of = (x) => x) => (v) => (Array.isArray(v) ? v.map(of) : []);
// An optional message: null when absent, so views can tell "not measured" from zeros.
const opt = (of) => (v) => (v && typeof v === 'object' ? of(v) : null);

/** A filler from a template: plain values are defaults, functions convert the field. */
function shape(template) {
  return (v) => {
    const src = obj(v);
    const out = { ...src };
    for (const [k, d] of Object.entries(template)) out[k] = typeof d === 'function' ? d(src[k]) : src[k] ?? d;
    return out;
  };
}

const bundleRef = shape({ registry: '', repository: '', digest: '', tag: '' });
const stat = shape({ median: 0, min: 0, max: 0, stddev: 0, samples: 0 });
const counts = shape({ selected: 0, candidate: 0, active: 0, failed: 0, pending: 0 });
const quality = shape({ measured: 0, could_not_run: 0, max_kld: null, min_top1_agreement: null, max_perplexity_ratio: null, min_golden_pass: null });

export const benchmark = shape({
  device_id: '', hardware_class: '', bundle: bundleRef, variant_digest: '', variant_name: '', trigger: 0, at_unix_ms: 0,
  prompt_set: '', repetitions: 0, load_ms: 0, ttft_ms: stat, prompt_tokens_per_second: stat,
  generation_tokens_per_second: stat, peak_rss_bytes: 0, throttled: false, error: '',
});

const telemetry = shape({
  at_unix_ms: 0, memory_available_bytes: 0, requests_total: 0, request_errors_total: 0, bundle_digest: '',
  generation_tokens_per_second: 0, prompt_tokens_per_second: 0, ttft_ms: 0, max_temperature_celsius: 0, throttled: false,
});

const inventory = shape({
  hostname: '', os: '', kernel: '', arch: '', cpu_model: '', cpu_cores: 0, cpu_features: list(),
  memory_total_bytes: 0, memory_available_bytes: 0, disk_total_bytes: 0, disk_available_bytes: 0, hardware_class: '',
  board_model: '', power_mode: '', gpus: list(shape({ name: '', vram_bytes: 0 })),
  temperatures: list(shape({ sensor: '', celsius: 0 })),
});

export const device = shape({
  id: '', labels: obj, inventory, connected: false, last_seen_unix_ms: 0, agent_version: '', running: bundleRef, phase: 0,
  error: shape({ code: 0, message: '', layer_digest: '' }), desired_generation: 0, applied_generation: 0, desired: bundleRef,
  rollout_id: '', cohort: '', running_variant: '', latest_benchmark: opt(benchmark), decommissioned: false,
  latest_telemetry: opt(telemetry), staged: list(bundleRef), desired_variant: '', running_runtime_platform: '',
});

const classStatus = shape({
  class: '', counts, success_ratio: 0, failure_ratio: 0, verdict: 0, reason: '', tokens_per_second_ratio: 0, ttft_ratio: 0,
  a_samples: 0, b_samples: 0, staged: 0, stage_failed: 0, quality: opt(quality), b_error_rate: 0, a_error_rate: 0,
  b_p95_latency_ms: 0, a_p95_latency_ms: 0,
});

const externalGate = shape({
  gate: '', step: 0, class: '', state: 0, message: '', decided_by: '', asked_unix_ms: 0, answered_unix_ms: 0,
  retry_unix_ms: 0, value: 0, attempts: 0,
});

const spec = shape({
  repository: '', candidate: '', selector: obj, steps: list(shape({ percent: 0, min_soak_seconds: 0 })), gates: obj,
  prestage: false, eval_suite: '',
});

export const rollout = shape({
  id: '', spec, candidate: bundleRef, state: 0, current_step: 0, counts, created_unix_ms: 0, updated_unix_ms: 0, message: '',
  step_started_unix_ms: 0, halted_classes: list(), classes: list(classStatus), pause_reason: 0, promoted: false,
  inconclusive_accepted: false, window_opens_unix_ms: 0, external_gates: list(externalGate),
});

export const rolloutDevice = shape({
  rollout_id: '', device_id: '', class: '', baseline: bundleRef, assigned_unix_ms: 0, outcome: 0, reason: '', attempts: 0,
});

const metric = shape({ a: stat, b: stat, ratio: 0, paired_ratio: stat, gate_ratio: 0 });
export const comparison = shape({
  rollout_id: '', candidate: bundleRef,
  classes: list(shape({ class: '', generation_tokens_per_second: metric, ttft_ms: metric, a_samples: 0, b_samples: 0, paired: 0, quality: opt(quality) })),
  devices: list(shape({ device_id: '', class: '', a_tokens_per_second: 0, b_tokens_per_second: 0, a_ttft_ms: 0, b_ttft_ms: 0 })),
});

export const event = shape({ id: 0, unix_ms: 0, type: '', rollout_id: '', device_id: '', message: '', rollout_seq: 0 });

export const bundle = shape({
  repository: '', digest: '', tags: list(), media_type: '', total_size: 0, pushed_unix_ms: 0, registry: '',
  variants: list(shape({ digest: '', name: '', architecture: '', quantization: '', size: 0 })),
  signatures: list(shape({ signed_digest: '', key_fingerprint: '', verified: false, problem: '' })),
});

export const summary = shape({
  devices: 0, online: 0, by_class: obj, by_phase: obj, by_bundle: obj, labels: obj, rollouts_active: 0, newest_event_id: 0,
});

export const bucket = shape({
  bucket_unix_ms: 0, class: '', bundle_digest: '', variant_digest: '', reports: 0, requests: 0, errors: 0,
  tokens_per_second_mean: 0, tokens_per_second_min: 0, tokens_per_second_max: 0, ttft_ms_mean: 0, ttft_ms_max: 0,
  throttled_reports: 0,
});

export const session = shape({ name: '', role: '', csrf: '', expires_unix_ms: 0 });
export const devicePage = shape({ devices: list(device), total: 0 });
