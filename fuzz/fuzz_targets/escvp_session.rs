//! The sans-IO client session fed arbitrary projector bytes, commands and clock jumps:
//! it never panics, every command completes at most once, and nothing stays pending once
//! the session is closed.
#![no_main]
use std::collections::HashSet;
use std::time::{Duration, Instant};

use escvp::session::{Event, Session, SessionConfig};
use escvp::value::{Power, PowerCommand, Property};
use escvp::vp21::Command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), now);
    let mut sent = HashSet::new();
    let mut done = HashSet::new();
    let mut i = 0;
    while i < data.len() {
        let op = data[i];
        i += 1;
        match op % 4 {
            0 => {
                let cmd = match op / 4 % 4 {
                    0 => Power::query(),
                    1 => PowerCommand::On.command(),
                    2 => PowerCommand::Off.command(),
                    _ => Command::Null,
                };
                if let Ok(id) = s.send(cmd, now) {
                    sent.insert(id);
                }
            }
            1 => now += Duration::from_millis(u64::from(op) * 500),
            2 => s.handle_timeout(now),
            _ => {
                let len = usize::from(op / 4).min(data.len() - i);
                s.handle_input(&data[i..i + len], now);
                i += len;
            }
        }
        while s.poll_transmit().is_some() {}
        while let Some(ev) = s.poll_event() {
            if let Event::Completed { id, .. } = ev {
                assert!(sent.contains(&id), "completed an unknown command");
                assert!(done.insert(id), "completed twice");
            }
        }
        if s.close_reason().is_some() {
            assert_eq!(s.pending(), 0);
            assert_eq!(sent.len(), done.len());
        }
    }
});
