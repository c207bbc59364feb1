//! `referral-service` — serve (default), `migrate`, `admin grant <phone>` or
//! `admin revoke <phone>`.

use referral_service::config::Config;
use referral_service::domain::PhoneNumber;
use service_kit::config::{ProcessEnv, Settings, exit_on_config_error};

const USAGE: &str =
    "usage: referral-service [migrate | admin grant <phone> | admin revoke <phone>]";

#[tokio::main]
async fn main() {
    let settings = Settings(ProcessEnv);
    let config = exit_on_config_error(Config::from_source(&settings));
    let _telemetry =
        exit_on_config_error(service_kit::telemetry::init(&settings, "referral-service"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        [] => serve(&config).await,
        ["migrate"] => migrate(&config).await,
        ["admin", "grant", phone] => grant_admin(&config, phone).await,
        ["admin", "revoke", phone] => revoke_admin(&config, phone).await,
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(message) = outcome {
        tracing::error!("{message}");
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

async fn serve(config: &Config) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.grpc_addr))?;
    referral_service::serve(config, listener, service_kit::server::shutdown_signal())
        .await
        .map_err(|err| err.to_string())
}

async fn migrate(config: &Config) -> Result<(), String> {
    let repository = referral_service::repository(config)
        .await
        .map_err(|err| err.to_string())?;
    referral_service::storage::MIGRATOR
        .run(repository.pool())
        .await
        .map_err(|err| format!("migrations: {err}"))?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn grant_admin(config: &Config, phone: &str) -> Result<(), String> {
    let phone = PhoneNumber::parse(phone, None).map_err(|err| err.to_string())?;
    let repository = referral_service::repository(config)
        .await
        .map_err(|err| err.to_string())?;
    if repository
        .grant_admin(&phone)
        .await
        .map_err(|err| err.to_string())?
    {
        tracing::info!(phone = ?phone, "admin role granted; the user's next sign-in carries it");
        Ok(())
    } else {
        Err(format!(
            "no user has the phone number {phone:?}; they must sign in first"
        ))
    }
}

async fn revoke_admin(config: &Config, phone: &str) -> Result<(), String> {
    let phone = PhoneNumber::parse(phone, None).map_err(|err| err.to_string())?;
    let repository = referral_service::repository(config)
        .await
        .map_err(|err| err.to_string())?;
    match repository
        .revoke_admin(&phone)
        .await
        .map_err(|err| err.to_string())?
    {
        Some(true) => {
            tracing::info!(
                phone = ?phone,
                "admin role revoked; access tokens already issued keep it until they expire"
            );
            Ok(())
        }
        Some(false) => {
            tracing::info!(phone = ?phone, "the user had no admin role; nothing to revoke");
            Ok(())
        }
        None => Err(format!("no user has the phone number {phone:?}")),
    }
}
