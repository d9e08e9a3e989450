mod vm;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("vm") => vm::main(&args[1..]),
        _ => anyhow::bail!("usage: cargo xtask vm -- COMMAND"),
    }
}
