//! Just enough of the Redis protocol (RESP2) for the ceilings: send a command, read one reply,
//! and read `MONITOR`'s stream. Its own client rather than the `redis` crate, so what the
//! ceiling costs the load generator stays as small as one write and one read per command.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub struct Connection {
    stream: BufReader<TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
}

type Io<T> = std::io::Result<T>;

fn invalid(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl Connection {
    pub async fn open(port: u16) -> Io<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            out: Vec::with_capacity(512),
            line: Vec::with_capacity(128),
        })
    }

    /// Sends `args` as one command and reads its reply (an error reply is `Ok(Reply::Error)`).
    pub async fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Io<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            let arg = arg.as_ref();
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.out).await?;
        self.read().await
    }

    /// The next reply on the connection (MONITOR sends one per command it sees).
    pub fn read(&mut self) -> Pin<Box<dyn Future<Output = Io<Reply>> + Send + '_>> {
        Box::pin(async move {
            self.line.clear();
            if self.stream.read_until(b'\n', &mut self.line).await? == 0 {
                return Err(invalid("connection closed"));
            }
            let line = self
                .line
                .strip_suffix(b"\r\n")
                .ok_or_else(|| invalid("line without CRLF"))?;
            let (kind, rest) = line.split_first().ok_or_else(|| invalid("empty line"))?;
            let text = String::from_utf8_lossy(rest).into_owned();
            let number = || text.parse::<i64>().map_err(|_| invalid("bad length"));
            Ok(match kind {
                b'+' => Reply::Status(text),
                b'-' => Reply::Error(text),
                b':' => Reply::Int(number()?),
                b'$' => {
                    let len = number()?;
                    if len < 0 {
                        Reply::Bulk(None)
                    } else {
                        let mut data = vec![0; usize::try_from(len).unwrap_or(0) + 2];
                        self.stream.read_exact(&mut data).await?;
                        data.truncate(data.len() - 2);
                        Reply::Bulk(Some(data))
                    }
                }
                b'*' => {
                    let len = number()?;
                    if len < 0 {
                        Reply::Array(None)
                    } else {
                        let mut items = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                        for _ in 0..len {
                            items.push(self.read().await?);
                        }
                        Reply::Array(Some(items))
                    }
                }
                _ => return Err(invalid("unknown reply type")),
            })
        })
    }
}

/// The command in one `MONITOR` line (`1700000000.123456 [0 127.0.0.1:5555] "GET" "k"`):
/// its arguments, unescaped, and the client's address.
pub fn parse_monitor_line(line: &str) -> Option<(String, Vec<Vec<u8>>)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let client = line[open + 1..close].split_whitespace().nth(1)?.to_owned();
    let mut args = Vec::new();
    let mut chars = line[close + 1..].bytes().peekable();
    while let Some(byte) = chars.next() {
        if byte != b'"' {
            continue;
        }
        let mut arg = Vec::new();
        loop {
            match chars.next()? {
                b'"' => break,
                b'\\' => match chars.next()? {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let hex = [chars.next()?, chars.next()?];
                        let hex = std::str::from_utf8(&hex).ok()?;
                        arg.push(u8::from_str_radix(hex, 16).ok()?);
                    }
                    other => arg.push(other),
                },
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    Some((client, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitor_line_gives_the_client_and_the_unescaped_arguments() {
        let line = r#"1700000000.123456 [0 127.0.0.1:40000] "EVALSHA" "ab\"c" "2" "x\\y" "\x01\n""#;
        let (client, args) = parse_monitor_line(line).expect("parses");
        assert_eq!(client, "127.0.0.1:40000");
        assert_eq!(
            args,
            vec![
                b"EVALSHA".to_vec(),
                b"ab\"c".to_vec(),
                b"2".to_vec(),
                b"x\\y".to_vec(),
                vec![1, b'\n'],
            ]
        );
    }

    #[test]
    fn a_line_without_a_client_is_not_a_command() {
        assert_eq!(parse_monitor_line("OK"), None);
    }
}
