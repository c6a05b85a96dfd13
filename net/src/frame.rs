//! Length-prefixed frames: a big-endian `u32` length, then that many bytes. The admin socket
//! puts JSON in them (`read`, `write`); node-to-node RPCs put postcard (see `rpc`).

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames larger than this are refused, so a confused peer cannot make us allocate gigabytes.
/// It fits the largest block (64 MiB) with room for its envelope.
pub const MAX_FRAME: usize = 80 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is larger than the limit of {1}")]
    TooLarge(usize, usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes one message as a JSON frame.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    write_bytes(w, &serde_json::to_vec(msg)?).await
}

/// Reads one JSON frame and decodes it. A clean end of stream before the length is `Closed`.
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(&read_bytes(r).await?)?)
}

/// Reads one JSON frame of at most `max` bytes and decodes it.
pub async fn read_within<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(
        &read_bytes_within(r, |_| max).await?,
    )?)
}

/// Writes one frame of raw bytes.
pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len(), MAX_FRAME));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of raw bytes. A clean end of stream before the length is `Closed`.
pub async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    read_bytes_within(r, |_| MAX_FRAME).await
}

/// How many leading bytes of a frame `read_bytes_within` shows its `limit` (enough for a
/// postcard enum's variant index, a varint of up to 5 bytes).
pub const PEEK: usize = 5;

/// Reads one frame whose largest allowed length depends on what it holds: `limit` sees the
/// body's first `PEEK` bytes (fewer if the body is shorter) and answers the limit, which is
/// checked before the rest is read or any room is made for it. Never more than `MAX_FRAME`.
pub async fn read_bytes_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: impl FnOnce(&[u8]) -> usize,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len, MAX_FRAME));
    }
    let mut head = [0u8; PEEK];
    let head = &mut head[..len.min(PEEK)];
    r.read_exact(head).await?;
    let max = limit(head).min(MAX_FRAME);
    if len > max {
        return Err(FrameError::TooLarge(len, max));
    }
    let mut body = vec![0u8; len];
    body[..head.len()].copy_from_slice(head);
    r.read_exact(&mut body[head.len()..]).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_oversized_lengths() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write(&mut a, &vec!["status".to_string()]).await.unwrap();
        let got: Vec<String> = read(&mut b).await.unwrap();
        assert_eq!(got, vec!["status".to_string()]);

        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        let err = read::<_, Vec<String>>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(..)), "{err}");

        drop(a);
        let err = read::<_, Vec<String>>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }

    #[tokio::test]
    async fn a_limit_by_kind_is_checked_before_the_body_is_read() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        // Kind 7 may be 10 bytes long, anything else 1,000.
        let limit = |head: &[u8]| if head.first() == Some(&7) { 10 } else { 1000 };
        write_bytes(&mut a, &[1u8; 500]).await.unwrap();
        assert_eq!(read_bytes_within(&mut b, limit).await.unwrap().len(), 500);
        write_bytes(&mut a, &[7u8, 0, 0]).await.unwrap();
        assert_eq!(
            read_bytes_within(&mut b, limit).await.unwrap(),
            vec![7, 0, 0]
        );
        // A length the kind does not allow is refused with only its first bytes sent: the
        // reader does not wait for (or make room for) the rest.
        a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        a.write_all(&[7u8; PEEK]).await.unwrap();
        let err = read_bytes_within(&mut b, limit).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_, 10)), "{err}");
        // An empty frame shows the limit an empty head.
        write_bytes(&mut a, &[]).await.unwrap();
        assert!(read_bytes_within(&mut b, limit).await.unwrap().is_empty());
    }
}
