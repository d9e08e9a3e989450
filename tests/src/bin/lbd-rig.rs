//! The rig as a program, for `cargo xtask run`: `lbd-rig [--once] [--requests N] CONFIG`.

fn main() -> anyhow::Result<()> {
    let mut once = false;
    let mut requests = 300;
    let mut config = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--once" => once = true,
            "--requests" => {
                let n = args.next().unwrap_or_default();
                requests = n.parse().map_err(|_| anyhow::anyhow!("--requests takes a number, got `{n}`"))?
            }
            _ => config = Some(std::path::PathBuf::from(arg)),
        }
    }
    let config = config.ok_or_else(|| anyhow::anyhow!("usage: lbd-rig [--once] [--requests N] CONFIG"))?;
    lb_tests::netns::require_root()?;
    match lb_tests::rig::run_interactive(&config, requests, once) {
        Err(_) if lb_tests::rig::stopped() => {
            println!("rig: interrupted; torn down");
            std::process::exit(130)
        }
        result => result,
    }
}
