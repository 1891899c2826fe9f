//! The `kvferry` command.

mod bench;
mod demo;
mod kv;
#[cfg(feature = "ascend")]
mod npu_demo;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kvferry", version, about = "KV-cache transfer engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Move a real KV cache from a prefill engine to a decode engine, verify
    /// every byte and print throughput.
    Demo {
        /// Transformer layers (each has a K and a V tensor).
        #[arg(long, default_value_t = 32)]
        layers: usize,
        /// Blocks per tensor.
        #[arg(long, default_value_t = 64)]
        blocks: usize,
        /// Tokens per block.
        #[arg(long, default_value_t = 128)]
        block_tokens: usize,
        /// KV heads held by one rank.
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Bytes per element (2 for bf16).
        #[arg(long, default_value_t = 2)]
        dtype_bytes: usize,
        /// Requests to pull.
        #[arg(long, default_value_t = 16)]
        requests: usize,
        /// Blocks of each request.
        #[arg(long, default_value_t = 16)]
        blocks_per_request: usize,
        /// auto (cma between processes of one host), tcp (forced), or both.
        #[arg(long, default_value = "both", value_parser = ["auto", "tcp", "both"])]
        transport: String,
        /// Where the KV caches live: host memory, or NPU memory (needs the
        /// Ascend runtime, or KVFERRY_ACL_LIBRARY pointing at the CANN
        /// stand-in; see docs/ascend.md).
        #[arg(long, default_value = "host", value_parser = ["host", "npu"])]
        device: String,
        /// With --device npu: the prefill side's NPU.
        #[arg(long, default_value_t = 0)]
        prefill_npu: u32,
        /// With --device npu: the decode side's NPU.
        #[arg(long, default_value_t = 1)]
        decode_npu: u32,
    },
    /// Throughput and latency of batched reads or writes between two
    /// engines, like Mooncake's transfer_engine_bench.
    Bench(bench::BenchArgs),
    /// The demo's prefill process (started by `kvferry demo`).
    #[command(hide = true)]
    DemoPrefill {
        #[arg(long)]
        layers: usize,
        #[arg(long)]
        blocks: usize,
        #[arg(long)]
        block_bytes: usize,
        #[arg(long, default_value = "host")]
        device: String,
        #[arg(long, default_value_t = 0)]
        npu: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            layers,
            blocks,
            block_tokens,
            kv_heads,
            head_dim,
            dtype_bytes,
            requests,
            blocks_per_request,
            transport,
            device,
            prefill_npu,
            decode_npu,
        } => {
            let block_bytes = block_tokens * kv_heads * head_dim * dtype_bytes;
            if block_bytes == 0
                || block_bytes % 8 != 0
                || blocks == 0
                || layers == 0
                || blocks_per_request > blocks
            {
                Err("the KV shape must be non-empty, blocks a multiple of 8 bytes, and requests no larger than the cache".to_string())
            } else {
                let transport = match transport.as_str() {
                    "auto" => demo::DemoTransport::Auto,
                    "tcp" => demo::DemoTransport::Tcp,
                    _ => demo::DemoTransport::Both,
                };
                let args = demo::DemoArgs {
                    shape: kv::KvShape {
                        layers,
                        blocks,
                        block_bytes,
                    },
                    requests,
                    blocks_per_request,
                };
                match device.as_str() {
                    "npu" => npu_demo(&args, transport, (prefill_npu, decode_npu)),
                    _ => demo::run(&args, transport),
                }
            }
        }
        Command::Bench(args) => bench::run(&args),
        Command::DemoPrefill {
            layers,
            blocks,
            block_bytes,
            device,
            npu,
        } => {
            let shape = kv::KvShape {
                layers,
                blocks,
                block_bytes,
            };
            match device.as_str() {
                "npu" => npu_prefill(shape, npu),
                _ => demo::run_prefill(shape),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("kvferry: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "ascend")]
fn npu_demo(
    args: &demo::DemoArgs,
    transport: demo::DemoTransport,
    (prefill, decode): (u32, u32),
) -> Result<(), String> {
    npu_demo::run(args, transport, npu_demo::Devices { prefill, decode })
}

#[cfg(feature = "ascend")]
fn npu_prefill(shape: kv::KvShape, device: u32) -> Result<(), String> {
    npu_demo::run_prefill(shape, device)
}

#[cfg(not(feature = "ascend"))]
fn npu_demo(_: &demo::DemoArgs, _: demo::DemoTransport, _: (u32, u32)) -> Result<(), String> {
    Err("this kvferry was built without Ascend support (cargo feature \"ascend\")".into())
}

#[cfg(not(feature = "ascend"))]
fn npu_prefill(_: kv::KvShape, _: u32) -> Result<(), String> {
    npu_demo(
        &demo::DemoArgs {
            shape: kv::KvShape {
                layers: 0,
                blocks: 0,
                block_bytes: 0,
            },
            requests: 0,
            blocks_per_request: 0,
        },
        demo::DemoTransport::Auto,
        (0, 0),
    )
}
