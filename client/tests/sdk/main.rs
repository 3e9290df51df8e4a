//! The SDK against in-process fake master and tablet servers (no real Luna processes).

mod admin;
mod fake;
mod fake_master;
mod multiplex;
mod retries;
mod routing;
mod scan;
