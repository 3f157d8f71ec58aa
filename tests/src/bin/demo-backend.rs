//! Demo model server for `cargo xtask run`: OpenAI-style
//! `/v1/chat/completions` (JSON, or an SSE token stream with `"stream": true`)
//! plus the test behaviours listed in `gateway_tests::backend`.

fn main() {
    let mut listen = "127.0.0.1:8000".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().expect("--listen ADDR"),
            "-h" | "--help" => {
                println!("demo-backend [--listen 127.0.0.1:8000]");
                return;
            }
            other => {
                eprintln!("unknown argument {other}; usage: demo-backend [--listen ADDR]");
                std::process::exit(2);
            }
        }
    }
    let b = gateway_tests::Backend::start_on(&listen, "demo");
    eprintln!("demo-backend listening on {}", b.addr);
    loop {
        std::thread::park();
    }
}
