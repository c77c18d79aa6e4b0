//! The `.wandb` transaction log framing: a 7-byte file header, then LevelDB-log style chunks in 32 KiB blocks,
//! each chunk checksummed with plain CRC-32 (IEEE) over its type byte and payload.

use std::io::Write;

use crate::{Error, Result};

/// Bytes per block; chunks never cross a block boundary.
pub const BLOCK_SIZE: usize = 32 * 1024;
/// Bytes of a chunk header: crc32 u32 LE, length u16 LE, type u8.
pub const CHUNK_HEADER_SIZE: usize = 7;
/// The file header: magic `:W&B`, u16 LE 0xBEE1, version 0.
pub const FILE_HEADER: [u8; 7] = [b':', b'W', b'&', b'B', 0xE1, 0xBE, 0];

/// Chunk types: a record fits whole in one chunk, or is split into first, middle(s) and last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkType {
    Full = 1,
    First = 2,
    Middle = 3,
    Last = 4,
}

/// CRC-32 (IEEE, as zlib computes it) over the type byte followed by the payload.
pub fn chunk_crc(chunk_type: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[chunk_type]);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends records to a transaction log.
pub struct TxLogWriter<W: Write> {
    out: W,
    /// Bytes already used in the current block (the file header counts in the first block).
    block_used: usize,
}

impl<W: Write> TxLogWriter<W> {
    /// Starts a log by writing the file header.
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(&FILE_HEADER)?;
        Ok(Self {
            out,
            block_used: FILE_HEADER.len(),
        })
    }

    /// Writes one record, splitting it into chunks at block boundaries.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let mut rest = payload;
        let mut first = true;
        loop {
            let left = BLOCK_SIZE - self.block_used;
            if left < CHUNK_HEADER_SIZE {
                // Too small for a chunk header: readers skip a zero-filled tail.
                self.out.write_all(&[0u8; CHUNK_HEADER_SIZE][..left])?;
                self.block_used = 0;
                continue;
            }
            let take = rest.len().min(left - CHUNK_HEADER_SIZE);
            let last = take == rest.len();
            let chunk_type = match (first, last) {
                (true, true) => ChunkType::Full,
                (true, false) => ChunkType::First,
                (false, false) => ChunkType::Middle,
                (false, true) => ChunkType::Last,
            } as u8;
            let (data, tail) = rest.split_at(take);
            self.out.write_all(&chunk_crc(chunk_type, data).to_le_bytes())?;
            // `take` < BLOCK_SIZE, so it fits in u16.
            self.out.write_all(&(take as u16).to_le_bytes())?;
            self.out.write_all(&[chunk_type])?;
            self.out.write_all(data)?;
            self.block_used += CHUNK_HEADER_SIZE + take;
            rest = tail;
            first = false;
            if last {
                return Ok(());
            }
        }
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads every record payload back from a whole log, checking the header, each CRC and the chunk sequence.
/// Errors name the byte offset at fault.
pub fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let at = |pos: usize, message: String| Error::invalid(format!("offset {pos}"), message);
    if bytes.len() < FILE_HEADER.len() || bytes[..FILE_HEADER.len()] != FILE_HEADER {
        return Err(Error::invalid(
            ".wandb transaction log",
            "not a .wandb transaction log: bad file header",
        ));
    }
    let mut records = Vec::new();
    let mut pending: Option<Vec<u8>> = None;
    let mut pos = FILE_HEADER.len();
    while pos < bytes.len() {
        let left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE;
        if left_in_block < CHUNK_HEADER_SIZE {
            let end = (pos + left_in_block).min(bytes.len());
            if bytes[pos..end].iter().any(|&b| b != 0) {
                return Err(at(pos, "block tail is not zero-filled".into()));
            }
            pos = end;
            continue;
        }
        if bytes.len() - pos < CHUNK_HEADER_SIZE {
            return Err(at(pos, "truncated chunk header".into()));
        }
        let crc = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        let len = u16::from_le_bytes([bytes[pos + 4], bytes[pos + 5]]) as usize;
        let chunk_type = bytes[pos + 6];
        let start = pos + CHUNK_HEADER_SIZE;
        if len > left_in_block - CHUNK_HEADER_SIZE || start + len > bytes.len() {
            return Err(at(pos, format!("chunk of {len} bytes runs past its block or the file")));
        }
        let data = &bytes[start..start + len];
        if chunk_crc(chunk_type, data) != crc {
            return Err(at(pos, "CRC mismatch".into()));
        }
        match (chunk_type, pending.as_mut()) {
            (1, None) => records.push(data.to_vec()),
            (2, None) => pending = Some(data.to_vec()),
            (3, Some(buf)) => buf.extend_from_slice(data),
            (4, Some(buf)) => {
                buf.extend_from_slice(data);
                records.extend(pending.take());
            }
            (t, _) => return Err(at(pos, format!("unexpected chunk type {t}"))),
        }
        pos = start + len;
    }
    if pending.is_some() {
        return Err(at(bytes.len(), "log ends inside a split record".into()));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(records: &[Vec<u8>]) -> Vec<u8> {
        let mut writer = TxLogWriter::new(Vec::new()).unwrap();
        for record in records {
            writer.append(record).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn header_bytes() {
        let bytes = write_log(&[]);
        assert_eq!(bytes, vec![0x3a, 0x57, 0x26, 0x42, 0xe1, 0xbe, 0x00]);
    }

    #[test]
    fn crc_is_zlib_crc32_over_type_and_payload() {
        // zlib.crc32(b"\x01123456789") and zlib.crc32(b"\x01")
        assert_eq!(chunk_crc(1, b"123456789"), 0x21B5_2EC0);
        assert_eq!(chunk_crc(1, b""), 0xA505_DF1B);
        // The standard check value: CRC-32 of "123456789" without a type byte prefix.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn small_record_is_one_full_chunk() {
        let bytes = write_log(&[b"hello".to_vec()]);
        assert_eq!(bytes.len(), 7 + 7 + 5);
        assert_eq!(&bytes[7..11], &chunk_crc(1, b"hello").to_le_bytes());
        assert_eq!(&bytes[11..13], &[5, 0]);
        assert_eq!(bytes[13], ChunkType::Full as u8);
        assert_eq!(&bytes[14..], b"hello");
        assert_eq!(read_records(&bytes).unwrap(), vec![b"hello".to_vec()]);
    }

    #[test]
    fn large_record_splits_into_first_middle_last() {
        // Two and a bit blocks of payload: first chunk fills block 0, a middle chunk fills block 1, last in block 2.
        let payload: Vec<u8> = (0..2 * BLOCK_SIZE + 100).map(|i| (i % 251) as u8).collect();
        let bytes = write_log(&[payload.clone(), b"after".to_vec()]);
        let first_len = BLOCK_SIZE - 7 - 7;
        assert_eq!(u16::from_le_bytes([bytes[11], bytes[12]]) as usize, first_len);
        assert_eq!(bytes[13], ChunkType::First as u8);
        let middle = BLOCK_SIZE;
        assert_eq!(
            u16::from_le_bytes([bytes[middle + 4], bytes[middle + 5]]) as usize,
            BLOCK_SIZE - 7
        );
        assert_eq!(bytes[middle + 6], ChunkType::Middle as u8);
        let last = 2 * BLOCK_SIZE;
        let last_len = payload.len() - first_len - (BLOCK_SIZE - 7);
        assert_eq!(
            u16::from_le_bytes([bytes[last + 4], bytes[last + 5]]) as usize,
            last_len
        );
        assert_eq!(bytes[last + 6], ChunkType::Last as u8);
        let crc = u32::from_le_bytes(bytes[last..last + 4].try_into().unwrap());
        assert_eq!(crc, chunk_crc(4, &payload[payload.len() - last_len..]));
        assert_eq!(read_records(&bytes).unwrap(), vec![payload, b"after".to_vec()]);
    }

    #[test]
    fn block_tail_under_seven_bytes_is_zero_filled() {
        // First record leaves exactly 3 bytes in block 0: 7 (file header) + 7 + n = BLOCK_SIZE - 3.
        let filler = vec![0xAB; BLOCK_SIZE - 3 - 14];
        let bytes = write_log(&[filler.clone(), b"next".to_vec()]);
        assert_eq!(&bytes[BLOCK_SIZE - 3..BLOCK_SIZE], &[0, 0, 0]);
        assert_eq!(bytes[BLOCK_SIZE + 6], ChunkType::Full as u8);
        assert_eq!(&bytes[BLOCK_SIZE + 7..], b"next");
        assert_eq!(read_records(&bytes).unwrap(), vec![filler, b"next".to_vec()]);
    }

    #[test]
    fn exactly_seven_bytes_left_gets_an_empty_first_chunk() {
        let filler = vec![1; BLOCK_SIZE - 7 - 14];
        let bytes = write_log(&[filler.clone(), b"xy".to_vec()]);
        assert_eq!(&bytes[BLOCK_SIZE - 3..BLOCK_SIZE - 1], &[0, 0]);
        assert_eq!(bytes[BLOCK_SIZE - 1], ChunkType::First as u8);
        assert_eq!(bytes[BLOCK_SIZE + 6], ChunkType::Last as u8);
        assert_eq!(read_records(&bytes).unwrap(), vec![filler, b"xy".to_vec()]);
    }

    #[test]
    fn reader_rejects_corruption() {
        let mut bytes = write_log(&[b"hello".to_vec()]);
        bytes[15] ^= 1;
        assert!(read_records(&bytes).unwrap_err().to_string().contains("CRC"));
        assert!(read_records(b"nope").is_err());
        let truncated = write_log(&[vec![0; BLOCK_SIZE]]);
        assert!(read_records(&truncated[..BLOCK_SIZE + 10]).is_err());
    }
}
