// turbostream.about: a badge on the host's About panel linking to the pack's documentation.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "turbostream.about",
  aboutPageBadges: [
    {
      label: "TurboStream",
      url: "https://github.com/turbostream/comfyui-turbostream",
      icon: "pi pi-bolt",
    },
  ],
});
