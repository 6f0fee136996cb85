//! The agent's state directory on the node (`--state-dir`, default `/run/iamlet`): what must
//! outlive one iamlet process but never the node's boot, such as the IMDSv2 token key and the
//! hand-over socket a successor finds its predecessor by.
//!
//! It is root's alone. kubelet's `DirectoryOrCreate` makes a hostPath directory 0755, and an
//! operator may point the flag at a directory that already exists, so the mode is set on
//! every start, not only on creation. Every file is created 0600 under a temporary name and
//! linked into place: a reader never sees half a file, and of two agents writing the same
//! file at once (a surge on a fresh node) the first one wins and the other reads it.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directory's mode: its owner's alone.
const DIR_MODE: u32 = 0o700;
/// Every file's mode.
pub const FILE_MODE: u32 = 0o600;

/// Why the state directory cannot be used. The agent still serves without it (each use says
/// what is lost).
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create the state directory {} (--state-dir): {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("the state directory {} (--state-dir) is not a directory (a symbolic link is refused)", path.display())]
    NotADirectory { path: PathBuf },
    #[error("the state directory {} (--state-dir) belongs to uid {owner}, not to iamlet's uid {uid}", path.display())]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error("cannot make the state directory {} (--state-dir) mode 0700: {source}", path.display())]
    Mode { path: PathBuf, source: io::Error },
}

/// The state directory, opened and made private.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens `path`, creating it (and its parents) when missing, and makes it mode 0700.
    ///
    /// # Errors
    /// When it cannot be created, is not a directory (a symbolic link included), belongs to
    /// another user (someone else could have planted files in it), or its mode cannot be set.
    pub fn open(path: &Path) -> Result<Self, StateDirError> {
        let path = path.to_path_buf();
        if let Err(source) = fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&path) {
            return Err(StateDirError::Create { path, source });
        }
        let metadata =
            fs::symlink_metadata(&path).map_err(|source| StateDirError::Create { path: path.clone(), source })?;
        if !metadata.is_dir() {
            return Err(StateDirError::NotADirectory { path });
        }
        let uid = nix::unistd::geteuid().as_raw();
        if metadata.uid() != uid {
            return Err(StateDirError::Owner { path, owner: metadata.uid(), uid });
        }
        if metadata.mode() & 0o7777 != DIR_MODE
            && let Err(source) = fs::set_permissions(&path, fs::Permissions::from_mode(DIR_MODE))
        {
            return Err(StateDirError::Mode { path, source });
        }
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `name` is in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The contents of `name`, or `None` when there is no such file or it is not one iamlet
    /// wrote: another owner, a mode wider than 0600, or not a regular file.
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        // Checked on the file opened, not on the path: nothing can be swapped in between.
        let opened = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(self.file(name));
        let mut file = match opened {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            // A symbolic link (ELOOP): not one iamlet wrote.
            Err(error) if error.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(None),
            Err(error) => return Err(error),
        };
        let metadata = file.metadata()?;
        let ours = metadata.is_file()
            && metadata.uid() == nix::unistd::geteuid().as_raw()
            && metadata.mode() & 0o7777 == FILE_MODE;
        if !ours {
            return Ok(None);
        }
        let mut contents = Vec::new();
        io::Read::read_to_end(&mut file, &mut contents)?;
        Ok(Some(contents))
    }

    /// Creates `name` with `contents` unless it exists. Returns whether it was created: when
    /// it exists already (another agent was first), nothing is written.
    ///
    /// # Errors
    /// When the file cannot be written or linked into place.
    pub fn create_new(&self, name: &str, contents: &[u8]) -> io::Result<bool> {
        let temporary = self.write_temporary(name, contents)?;
        let linked = fs::hard_link(&temporary, self.file(name));
        let _ = fs::remove_file(&temporary);
        match linked {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Replaces `name` with `contents` at once (a rename over it): a reader sees the old file
    /// or the new one, never a mix.
    ///
    /// # Errors
    /// When the file cannot be written or renamed into place.
    pub fn replace(&self, name: &str, contents: &[u8]) -> io::Result<()> {
        let temporary = self.write_temporary(name, contents)?;
        fs::rename(&temporary, self.file(name)).inspect_err(|_| {
            let _ = fs::remove_file(&temporary);
        })
    }

    /// Removes `name`, if it is there.
    ///
    /// # Errors
    /// When it is there and cannot be removed.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.file(name)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// `contents` in a new 0600 file beside `name`, named after this process so two agents
    /// never share one.
    fn write_temporary(&self, name: &str, contents: &[u8]) -> io::Result<PathBuf> {
        let path = self.file(&format!(".{name}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&path);
        let mut file = OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&path)?;
        if let Err(error) = file.write_all(contents).and_then(|()| file.sync_all()) {
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_directory_made_0755_by_the_kubelet_is_made_0700() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("run/iamlet");
        let dir = StateDir::open(&path).unwrap();
        assert_eq!(mode(&path), 0o700, "created private");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::open(&path).unwrap();
        assert_eq!(mode(&path), 0o700, "an existing 0755 directory is tightened");
        assert_eq!(dir.path(), path);
    }

    #[test]
    fn a_symbolic_link_or_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = StateDir::open(&link).unwrap_err();
        assert!(matches!(error, StateDirError::NotADirectory { .. }), "{error}");
        let file = root.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(StateDir::open(&file).is_err());
    }

    #[test]
    fn files_are_0600_written_whole_the_first_writer_wins_and_a_replacement_is_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&root.path().join("state")).unwrap();
        assert_eq!(dir.read("key").unwrap(), None);
        assert!(dir.create_new("key", b"first").unwrap());
        assert!(!dir.create_new("key", b"second").unwrap(), "another agent was first");
        assert_eq!(dir.read("key").unwrap().as_deref(), Some(&b"first"[..]));
        assert_eq!(mode(&dir.file("key")), 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["key"], "no temporary file stays");
        dir.replace("key", b"replaced").unwrap();
        assert_eq!(dir.read("key").unwrap().as_deref(), Some(&b"replaced"[..]), "replaced whole");
        assert_eq!(mode(&dir.file("key")), 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["key"], "no temporary file stays after a replacement either");
        dir.remove("key").unwrap();
        dir.remove("key").unwrap();
        assert_eq!(dir.read("key").unwrap(), None);
    }

    #[test]
    fn a_file_iamlet_did_not_write_is_not_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&root.path().join("state")).unwrap();
        fs::write(dir.file("key"), "planted").unwrap();
        fs::set_permissions(dir.file("key"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(dir.read("key").unwrap(), None, "a mode wider than 0600");
        let elsewhere = root.path().join("elsewhere");
        fs::write(&elsewhere, "planted").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.file("link")).unwrap();
        assert_eq!(dir.read("link").unwrap(), None, "a symbolic link, even to a 0600 file of ours");
    }
}
