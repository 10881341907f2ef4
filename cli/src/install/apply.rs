//! `--apply`: the install sent to the API server with server-side apply (field manager
//! [`FIELD_MANAGER`], conflicts forced: the install owns what it renders), one object at a time
//! in the order given, and the uninstall's deletes. Each object is reported on stdout as it is
//! done; the first failure stops the run and names the object.

use std::process::ExitCode;

use anyhow::Context as _;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};

use super::document::{Document, Object};

/// The field manager of everything `trellis install --apply` writes.
pub const FIELD_MANAGER: &str = "trellis-install";

fn api(client: &kube::Client, object: &Object) -> Api<DynamicObject> {
    let resource = object.api_resource();
    match object.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("--apply: reading the kubeconfig (KUBECONFIG, ~/.kube/config or the in-cluster service account)")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Server-side applies every document in order (`dry_run`: the server checks, nothing is kept).
pub fn apply(documents: &[Document], dry_run: bool) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = client().await?;
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        if dry_run {
            params = params.dry_run();
        }
        let suffix = if dry_run { " (server dry run)" } else { "" };
        for document in documents {
            let object = &document.object;
            api(&client, object)
                .patch(object.name(), &params, &Patch::Apply(object.to_json()))
                .await
                .with_context(|| format!("applying {}", object.describe()))?;
            println!("applied {}{suffix}", object.describe());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Deletes every document in order; one already gone is reported, not an error.
pub fn delete(documents: &[Document], dry_run: bool) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = client().await?;
        let mut params = DeleteParams::background();
        if dry_run {
            params = params.dry_run();
        }
        let suffix = if dry_run { " (server dry run)" } else { "" };
        for document in documents {
            let object = &document.object;
            match api(&client, object).delete(object.name(), &params).await {
                Ok(_) => println!("deleted {}{suffix}", object.describe()),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    println!("absent {}", object.describe());
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting {}", object.describe()));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
