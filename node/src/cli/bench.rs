use clap::Subcommand;
#[derive(Subcommand)]
pub enum BenchCommand {
    X,
}
pub async fn run(_c: BenchCommand) -> anyhow::Result<()> {
    Ok(())
}
