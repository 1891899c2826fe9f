//! The `kvferry` command.

mod bench;
mod demo;
mod kv;

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
                demo::run(&args, transport)
            }
        }
        Command::Bench(args) => bench::run(&args),
        Command::DemoPrefill {
            layers,
            blocks,
            block_bytes,
        } => demo::run_prefill(kv::KvShape {
            layers,
            blocks,
            block_bytes,
        }),
    };
    if let Err(e) = result {
        eprintln!("kvferry: {e}");
        std::process::exit(1);
    }
}
