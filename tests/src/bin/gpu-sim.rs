//! `gpu-sim`: the simulated GPU model server (see `gateway_tests::gpusim`):
//! continuous batching, a FIFO queue, a KV cache of `kv-tokens / 16` blocks
//! with vLLM-like automatic prefix caching (`POST /reset_prefix_cache` empties
//! it), vLLM's metric names.
//!
//! gpu-sim --listen 127.0.0.1:8001 [--name M] [--engine vllm|sglang|tgi|triton]
//!         [--max-batch 8] [--kv-tokens 32768] [--step-ms 10] [--per-seq-ms 0.5]
//!         [--prefill-ms-per-1k 20] [--speed 1.0]

use gateway_tests::gpusim::{GpuSim, SimConfig};

fn main() {
    let mut cfg = SimConfig::default();
    let mut listen = "127.0.0.1:8001".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = v(),
            "--name" => cfg.name = v(),
            "--engine" => cfg.engine = v(),
            "--max-batch" => cfg.max_batch = v().parse().expect("--max-batch N"),
            "--kv-tokens" => cfg.kv_tokens = v().parse().expect("--kv-tokens N"),
            "--step-ms" => cfg.step_ms = v().parse().expect("--step-ms F"),
            "--per-seq-ms" => cfg.per_seq_ms = v().parse().expect("--per-seq-ms F"),
            "--prefill-ms-per-1k" => cfg.prefill_ms_per_1k_tokens = v().parse().expect("F"),
            "--speed" => cfg.speed = v().parse().expect("--speed F"),
            "-h" | "--help" => {
                println!("gpu-sim --listen ADDR [--name M] [--engine vllm|sglang|tgi|triton] [--max-batch N] [--kv-tokens N] [--step-ms F] [--per-seq-ms F] [--prefill-ms-per-1k F] [--speed F]");
                return;
            }
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let sim = GpuSim::start_on(&listen, cfg);
    eprintln!("gpu-sim listening on {}", sim.addr);
    loop {
        std::thread::park();
    }
}
