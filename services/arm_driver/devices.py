"""Builds the arm device named by the driver's flags: a built-in sim, or LeRobot's own classes.

LeRobot is imported only when a LeRobot type is asked for, so the rest of rdv never needs torch.
A daemon must never sit at a prompt: LeRobot devices are connected with calibrate=False and an
existing calibration file. This module must never send a motion command itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shlex
import types
import typing
from pathlib import Path
from typing import Any

from services.arm_driver.config import DeviceSpec
from services.sim import (
    SO101_LIMITS,
    SimFollowerConfig,
    SimLeaderConfig,
    SimSO101Follower,
    SimSO101Leader,
)

SIM_TYPES = {
    "robot": {"sim": SimSO101Follower, "sim_so101_follower": SimSO101Follower},
    "teleop": {"sim": SimSO101Leader, "sim_so101_leader": SimSO101Leader},
}
SIM_CONFIGS = {SimSO101Follower: SimFollowerConfig, SimSO101Leader: SimLeaderConfig}
# Module layouts of LeRobot: 0.4.3+ (so_follower/so_leader) and older (so101_follower/...).
LEROBOT_DEVICE_MODULES = {
    "robot": ("lerobot.robots.so_follower", "lerobot.robots.so101_follower"),
    "teleop": ("lerobot.teleoperators.so_leader", "lerobot.teleoperators.so101_leader"),
}


class DeviceError(RuntimeError):
    """The device cannot be built or connected; the message says what to do."""


def make_device(spec: DeviceSpec) -> Any:
    """A LeRobot-interface device (Robot or Teleoperator), not yet connected."""
    sim_class = SIM_TYPES[spec.kind].get(spec.type)
    if sim_class is not None:
        config_class = SIM_CONFIGS[sim_class]
        fields = dict(spec.options)
        if spec.id:
            fields["id"] = spec.id
        if spec.port:
            fields["port"] = spec.port
        return sim_class(config_class(**_typed_fields(config_class, fields)))
    return _make_lerobot_device(spec)


class CalibrationError(DeviceError):
    """No calibration file, or one that does not match the motors: a configuration error (exit
    78), fixed by `rdv calibrate` with the same device flags, never by a prompt in the daemon."""


def calibrate_command(spec: DeviceSpec) -> str:
    """The `rdv calibrate ...` line for this device, with the flags the user gave."""
    flags = [f"--{spec.kind}.type={spec.type}"]
    flags += [f"--{spec.kind}.{name}={getattr(spec, name)}" for name in ("port", "id")
              if getattr(spec, name)]  # fmt: skip
    return "rdv calibrate " + " ".join(shlex.quote(flag) for flag in flags)


def check_calibration_file(device: Any, spec: DeviceSpec) -> None:
    """Refuse, before touching the port, a LeRobot device whose calibration file is missing."""
    path = getattr(device, "calibration_fpath", None)
    if path is not None and not Path(path).is_file():
        raise CalibrationError(
            f"{spec.type} {spec.id or '(default id)'}: no calibration file at {path}. Calibrate "
            f"it once, with the arm at hand: `{calibrate_command(spec)}` (LeRobot's interactive "
            "calibration); the driver never prompts."
        )


def connect_device(device: Any, spec: DeviceSpec | None = None) -> None:
    """Connect without ever prompting: calibration must already exist and match the motors.

    With a LeRobot motors bus the calibration is compared with the motors' registers before
    the device is connected for real, so a mismatched arm is never configured or torqued.
    """
    if spec is not None:
        check_calibration_file(device, spec)
    bus = getattr(device, "bus", None)
    if spec is not None and bus is not None and hasattr(bus, "read_calibration"):
        try:
            bus.connect()
            matches = bus.is_calibrated
            bus.disconnect(disable_torque=False)
        except Exception as exc:
            with contextlib.suppress(Exception):
                bus.disconnect(disable_torque=False)
            raise DeviceError(f"cannot connect {type(device).__name__}: {exc}") from exc
        if not matches:
            raise CalibrationError(
                f"{spec.type} {spec.id or '(default id)'}: the calibration in "
                f"{getattr(device, 'calibration_fpath', '?')} does not match the motors on "
                f"{spec.port} (homing offsets or ranges differ: another arm, or it was "
                f"recalibrated elsewhere). Run `{calibrate_command(spec)}`; the driver never "
                "prompts."
            )
    try:
        device.connect(calibrate=False)
    except Exception as exc:
        raise DeviceError(f"cannot connect {type(device).__name__}: {exc}") from exc
    if not getattr(device, "is_calibrated", True):
        device.disconnect()
        command = calibrate_command(spec) if spec is not None else "rdv calibrate"
        raise CalibrationError(
            f"{type(device).__name__} has no calibration matching its motors; run `{command}` "
            "with the same --robot/--teleop flags first"
        )


def joint_keys(device: Any) -> tuple[str, ...]:
    """The device's joint keys in its own order (LeRobot's action_features order)."""
    return tuple(key for key, kind in device.action_features.items() if kind is float)


def joint_limits(
    device: Any, keys: tuple[str, ...], override: dict[str, tuple[float, float]] | None
) -> tuple[tuple[float, float], ...]:
    """Safety limits per key: the flag's, else the device's own, else SO101 nominal limits."""
    known = dict(SO101_LIMITS)
    known.update(getattr(getattr(device, "config", None), "limits", None) or {})
    unknown = sorted(set(override or {}) - set(keys))
    if unknown:  # most likely a typo: ignoring it would leave wider limits in force
        raise DeviceError(f"--joint-limits names {unknown}, which are not joints of {keys}")
    known.update(override or {})
    missing = [key for key in keys if key not in known]
    if missing:
        raise DeviceError(f"no joint limits for {missing}; give them with --joint-limits")
    return tuple(known[key] for key in keys)


def set_torque(device: Any, enabled: bool) -> bool:
    """Switch torque if the device can; returns False when it has no way to."""
    if hasattr(device, "set_torque"):
        device.set_torque(enabled)
        return True
    bus = getattr(device, "bus", None)  # LeRobot's motors bus on SO-100/101 arms
    method = getattr(bus, "enable_torque" if enabled else "disable_torque", None)
    if method is None:
        return False
    method()
    return True


def _make_lerobot_device(spec: DeviceSpec) -> Any:
    if spec.kind == "robot":
        base_module = "lerobot.robots"
        config_name, factory_name = "RobotConfig", "make_robot_from_config"
    else:
        base_module = "lerobot.teleoperators"
        config_name, factory_name = "TeleoperatorConfig", "make_teleoperator_from_config"
    try:
        base = importlib.import_module(base_module)
    except ImportError:
        sims = ", ".join(sorted(SIM_TYPES[spec.kind]))
        raise DeviceError(
            f"--{spec.kind}.type={spec.type} needs LeRobot, which is not installed. Install it "
            f"with `pip install 'rdv[lerobot]'`, or use a built-in type: {sims}"
        ) from None
    for module in LEROBOT_DEVICE_MODULES[spec.kind]:
        try:  # importing registers the device's config class with LeRobot's choice registry
            importlib.import_module(module)
        except ImportError:
            continue
    config_base = getattr(base, config_name)
    try:
        config_class = config_base.get_choice_class(spec.type)
    except Exception:
        raise DeviceError(
            f"LeRobot knows no {spec.kind} type {spec.type!r} (known: "
            f"{', '.join(sorted(config_base.get_known_choices()))})"
        ) from None
    fields = dict(spec.options)
    for name in ("port", "id"):
        if getattr(spec, name):
            fields[name] = getattr(spec, name)
    config = config_class(**_typed_fields(config_class, fields))
    return getattr(base, factory_name)(config)


def _typed_fields(config_class: type, fields: dict[str, str]) -> dict[str, Any]:
    """Convert flag strings to the config dataclass's field types."""
    known = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    out: dict[str, Any] = {}
    for name, text in fields.items():
        if name not in known:
            raise DeviceError(
                f"{config_class.__name__} has no field {name!r} (fields: {', '.join(known)})"
            )
        out[name] = _convert(text, hints.get(name, str), name)
    return out


def _convert(text: str, hint: Any, name: str) -> Any:
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        hint = options[0] if len(options) == 1 else str
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if hint in (int, float):
            return hint(text)
        if hint is str:
            return text
        if isinstance(hint, type) and issubclass(hint, Path):
            return hint(text)  # e.g. LeRobot's calibration_dir
        return json.loads(text)  # dicts, lists, tuples: LeRobot-style JSON values
    except ValueError:
        raise DeviceError(f"--*.{name}={text!r} is not a valid {hint}") from None
