//! `lode control init|issue|serve|status` and `lode start`: the assignment service's
//! command line. The work is in lode-control; this builds the pieces and prints.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::{Context, Result};
use lode_control::api::{Identity, Role, StartReply, StartRequest};
use lode_control::pki::{self, Credentials};
use lode_control::rpc::{self, Client, Endpoint, Listener};
use lode_control::service::{self, Service};
use lode_control::state::{AssignmentRecord, State, WorkerRecord};

use crate::Env;
use crate::cli::{ControlClientArgs, ControlCommand, StartArgs};
use crate::output::print_json;

pub async fn run(env: &Env, command: ControlCommand) -> Result<()> {
    match command {
        ControlCommand::Init { dir, hosts, days } => {
            pki::init(&dir, &hosts, days)?;
            println!(
                "a CA and the control service's certificate are in {}; keep ca.key there",
                dir.display()
            );
        }
        ControlCommand::Issue(a) => {
            let who = match (a.worker, a.admin, a.control) {
                (Some(id), _, _) => Identity {
                    role: Role::Worker,
                    id,
                },
                (_, Some(id), _) => Identity {
                    role: Role::Admin,
                    id,
                },
                (_, _, Some(id)) => Identity {
                    role: Role::Control,
                    id,
                },
                _ => {
                    anyhow::bail!("name who the certificate is for: --worker, --admin or --control")
                }
            };
            pki::issue(&a.dir, &who, &a.hosts, a.days)?;
            let stem = format!("{}-{}", pki::role_name(who.role), who.id);
            println!(
                "issued {}/{}: {}/{stem}.pem and {stem}.key (with ca.pem)",
                pki::role_name(who.role),
                who.id,
                a.dir.display()
            );
        }
        ControlCommand::Serve(a) => {
            let who = Identity {
                role: Role::Control,
                id: a.name.clone(),
            };
            let creds = Arc::new(Credentials::load(&a.creds, &who)?);
            let store = env.store()?;
            let kms: Arc<dyn lode_kms::Kms> = Arc::from(env.kms_existing()?);
            let config = service::Config {
                lease: a.lease,
                heartbeat_interval: a.heartbeat_interval,
                kms_timeout: a.kms_timeout,
                ..service::Config::default()
            };
            let service = Arc::new(Service::new(State::new(store), kms, creds.clone(), config));
            let (listener, at) = match (&a.listen, &a.socket) {
                (Some(addr), _) => {
                    let listener = Listener::tls(addr, creds).await?;
                    let at = listener
                        .local_addr()
                        .map(|addr| format!("https://{addr}"))
                        .unwrap_or_else(|| addr.clone());
                    (listener, at)
                }
                (None, Some(path)) => (Listener::unix(path)?, format!("unix:{}", path.display())),
                (None, None) => anyhow::bail!("give --listen ADDR or --socket PATH"),
            };
            println!("lode control: listening on {at}");
            std::io::stdout().flush().ok();
            rpc::serve(listener, service)
                .await
                .context("the control service stopped")?;
        }
        ControlCommand::Status(a) => {
            let client = client(&a)?;
            let workers: Vec<WorkerRecord> = client.call("/v1/workers", &()).await?;
            let assignments: Vec<AssignmentRecord> = client.call("/v1/assignments", &()).await?;
            if env.cli_json {
                print_json(&serde_json::json!({
                    "workers": workers,
                    "assignments": assignments,
                }))?;
            } else {
                println!("{} worker(s)", workers.len());
                for w in &workers {
                    println!(
                        "  {}  {}  capacity {}  attached {}  warm {}  heartbeat {}",
                        w.worker,
                        w.address,
                        w.capacity,
                        w.attached.len(),
                        w.warm.len(),
                        w.heartbeat_unix_ms
                    );
                }
                println!(
                    "{} start(s)",
                    assignments.iter().map(|x| x.starts.len()).sum::<usize>()
                );
                for x in &assignments {
                    for s in &x.starts {
                        println!(
                            "  {}  {}  on {}  start {}  lease until {}",
                            s.image, x.manifest, x.worker, s.start, s.lease_expires_unix_ms
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

pub async fn start(env: &Env, a: StartArgs) -> Result<()> {
    let client = client(&a.client)?;
    let reply: StartReply = client
        .call("/v1/start", &StartRequest { image: a.image })
        .await?;
    if env.cli_json {
        print_json(&reply)?;
    } else {
        println!("start     {}", reply.start);
        println!("worker    {}", reply.worker);
        println!("manifest  {}", reply.manifest);
        println!("name      {}", reply.name);
        println!("placed    {:?}", reply.placed);
        if let Some(export) = &reply.nbd_export {
            println!("nbd       {export}");
        }
        if let Some(file) = &reply.file {
            println!("file      {file}");
        }
    }
    Ok(())
}

fn client(a: &ControlClientArgs) -> Result<Client> {
    let endpoint: Endpoint = a.control.parse()?;
    let who = Identity {
        role: Role::Admin,
        id: a.as_name.clone(),
    };
    let creds = Arc::new(Credentials::load(&a.creds, &who)?);
    Ok(Client::new(endpoint, creds)?)
}
