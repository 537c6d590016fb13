"""The fake's output/, input/ and temp/ folders, in memory. Output and input survive a restart; temp does not."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FOLDERS = ("output", "input", "temp")


@dataclass
class Files:
    data: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (type, subfolder, filename)

    def get(self, folder: str, subfolder: str, filename: str) -> bytes | None:
        return self.data.get((folder, subfolder, filename))

    def put(self, folder: str, subfolder: str, filename: str, data: bytes) -> None:
        self.data[(folder, subfolder, filename)] = data

    def names(self, folder: str) -> list[str]:
        return sorted(f"{sub}/{name}" if sub else name for kind, sub, name in self.data if kind == folder)

    def clear_temp(self) -> None:
        for key in [k for k in self.data if k[0] == "temp"]:
            del self.data[key]

    def save_numbered(self, folder: str, prefix: str, ext: str, data: bytes, trailing: str = "_") -> dict[str, str]:
        """SaveImage naming: `<prefix>_<counter:05>_.png`, the counter one above the highest one already there."""
        subfolder, _, name = prefix.rpartition("/")
        pattern = re.compile(re.escape(name) + r"_(\d{5,})")
        used = [int(m.group(1)) for kind, sub, existing in self.data
                if kind == folder and sub == subfolder and (m := pattern.match(existing))]
        filename = f"{name}_{max(used, default=0) + 1:05}{trailing}.{ext}"
        self.put(folder, subfolder, filename, data)
        return {"filename": filename, "subfolder": subfolder, "type": folder}

    def upload(self, folder: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str:
        """/upload/image naming: overwrite keeps the name; identical bytes reuse it; otherwise `name (1).png`."""
        stem, dot, ext = filename.rpartition(".")
        if not dot:
            stem, ext = filename, ""
        candidate, counter = filename, 1
        while not overwrite and (existing := self.get(folder, subfolder, candidate)) is not None:
            if existing == data:
                break
            candidate = f"{stem} ({counter}){dot}{ext}"
            counter += 1
        self.put(folder, subfolder, candidate, data)
        return candidate
