"""The daemon: a workspace folder where dropped data files keep one run training, unattended.

    evertrain init DIR --model M      # create the workspace (evertrain.toml, inbox/, queue/, done/, ...)
    evertrain run DIR                 # train every file dropped into DIR/inbox, until SIGINT/SIGTERM
"""
