//! How a device's transport half hands its queues to the half that runs on the event loop: a
//! command channel plus an eventfd that wakes the loop.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivateError, DeviceSignals};

pub(crate) enum Command {
    Activate { queues: Vec<Queue>, signals: Arc<DeviceSignals> },
    Reset,
}

/// The transport half's end.
pub(crate) struct CommandSender {
    commands: Sender<Command>,
    kick: EventFd,
}

/// The event loop's end: register [`CommandReceiver::fd`] and call `drain` when it fires.
pub(crate) struct CommandReceiver {
    commands: Receiver<Command>,
    kick: EventFd,
}

pub(crate) fn command_channel() -> std::io::Result<(CommandSender, CommandReceiver)> {
    let kick = EventFd::new(libc::EFD_NONBLOCK)?;
    let (commands, receiver) = channel();
    Ok((CommandSender { commands, kick: kick.try_clone()? }, CommandReceiver { commands: receiver, kick }))
}

impl CommandSender {
    /// Hands the driver's queues to the event loop, if there are as many as the device has.
    pub(crate) fn activate(
        &self,
        expected: usize,
        queues: Vec<Queue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        if queues.len() != expected {
            return Err(ActivateError::QueueCount { expected, found: queues.len() });
        }
        self.send(Command::Activate { queues, signals })
    }

    pub(crate) fn send(&self, command: Command) -> Result<(), ActivateError> {
        self.commands
            .send(command)
            .map_err(|_| ActivateError::Backend("its event loop has stopped".into()))?;
        self.kick.write(1).map_err(|e| ActivateError::Backend(e.to_string()))
    }
}

impl CommandReceiver {
    pub(crate) fn fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The commands sent since the last call, oldest first.
    pub(crate) fn drain(&self) -> Vec<Command> {
        let _ = self.kick.read();
        self.commands.try_iter().collect()
    }

    /// Makes the event loop call the backend soon, with or without a command (the kick is a
    /// level-triggered eventfd: it fires once the backend is registered, however late).
    pub(crate) fn wake(&self) {
        let _ = self.kick.write(1);
    }
}
